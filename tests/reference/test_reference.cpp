// Self-test of the naive reference (tests/reference/reference.hpp):
//  - every analytic gradient against central finite differences (step 1e-6);
//  - a few values computed by hand;
//  - the T_v = 0 rule.
// The main() of Catch2 is provided by the test runner, not here.
#include <catch2/catch.hpp>

#include "reference/reference.hpp"

#include <cmath>
#include <functional>
#include <random>
#include <string>
#include <vector>

namespace {

using vec = std::vector<double>;
using ivec = std::vector<long long>;
using mvec = std::vector<int>;

constexpr double fd_step = 1e-6;
constexpr double fd_rel = 1e-6;
constexpr double fd_abs = 1e-8;  // rounding floor of a central difference of O(1) values

// Compares g against central differences of f at x, entry by entry.
void check_gradient(const std::function<double(const vec&)>& f, const vec& x, const vec& g, const std::string& what) {
  REQUIRE(g.size() == x.size());
  double gmax = 0.0;
  for (std::size_t i = 0; i < x.size(); ++i) {
    vec xp = x, xm = x;
    xp[i] += fd_step;
    xm[i] -= fd_step;
    const double fd = (f(xp) - f(xm)) / (2.0 * fd_step);
    INFO(what << ": entry " << i << " analytic " << g[i] << " finite difference " << fd);
    CHECK(std::fabs(fd - g[i]) <= fd_rel * std::fabs(g[i]) + fd_abs);
    gmax = std::max(gmax, std::fabs(g[i]));
  }
  INFO(what << ": the gradient must not be trivially zero");
  CHECK(gmax > 1e-3);
}

vec random_vec(std::mt19937& rng, std::size_t n, double lo, double hi) {
  std::uniform_real_distribution<double> u(lo, hi);
  vec v(n);
  for (double& x : v) x = u(rng);
  return v;
}

vec row_softmax(const vec& Z, long long T, long long E) {
  vec P(Z.size());
  for (long long t = 0; t < T; ++t) {
    double mx = Z[static_cast<std::size_t>(t * E)];
    for (long long e = 1; e < E; ++e) mx = std::max(mx, Z[static_cast<std::size_t>(t * E + e)]);
    double s = 0.0;
    for (long long e = 0; e < E; ++e) s += std::exp(Z[static_cast<std::size_t>(t * E + e)] - mx);
    for (long long e = 0; e < E; ++e)
      P[static_cast<std::size_t>(t * E + e)] = std::exp(Z[static_cast<std::size_t>(t * E + e)] - mx) / s;
  }
  return P;
}

// Distinct random experts per row (the first k of a random permutation).
ivec random_topk(std::mt19937& rng, long long T, long long E, long long k) {
  ivec I;
  for (long long t = 0; t < T; ++t) {
    ivec perm(static_cast<std::size_t>(E));
    for (long long e = 0; e < E; ++e) perm[static_cast<std::size_t>(e)] = e;
    std::shuffle(perm.begin(), perm.end(), rng);
    for (long long s = 0; s < k; ++s) I.push_back(perm[static_cast<std::size_t>(s)]);
  }
  return I;
}

// The standard small problem: T = 6, E = 5, k = 3, d = 5; token 2 is padding,
// slot 1 of token 4 is dropped, h_{1,0} is the zero vector.
struct problem {
  long long T = 6, E = 5, k = 3, d = 5;
  mvec mask{1, 1, 0, 1, 1, 1};
  vec Z, P, H;
  ivec I;
  explicit problem(unsigned seed) {
    std::mt19937 rng(seed);
    Z = random_vec(rng, static_cast<std::size_t>(T * E), -2.0, 2.0);
    P = row_softmax(Z, T, E);
    I = random_topk(rng, T, E, k);
    I[static_cast<std::size_t>(4 * k + 1)] = -1;
    H = random_vec(rng, static_cast<std::size_t>(T * k * d), -1.0, 1.0);
    for (long long q = 0; q < d; ++q) H[static_cast<std::size_t>((1 * k + 0) * d + q)] = 0.0;
  }
};

}  // namespace

using namespace moereg_ref;

TEST_CASE("reference load balancing: gradient and hand values", "[reference]") {
  problem pr(1);
  const double alpha = 0.7;
  auto f = [&](const vec& P) { return load_balancing(P, pr.I, pr.mask, pr.T, pr.E, pr.k, alpha).value; };
  const result r = load_balancing(pr.P, pr.I, pr.mask, pr.T, pr.E, pr.k, alpha);
  check_gradient(f, pr.P, r.grad, "load_balancing");
  for (long long e = 0; e < pr.E; ++e) CHECK(r.grad[static_cast<std::size_t>(2 * pr.E + e)] == 0.0);

  // Perfectly uniform routing: T = E = 4, k = 2, token t -> experts t and t+1 (mod 4),
  // P = 1/4 everywhere. f_e = 2 / (2 * 4) = 1/4, pbar_e = 1/4,
  // L = alpha * 4 * 4 * (1/4)(1/4) = alpha * 1.
  const vec Pu(16, 0.25);
  const ivec Iu{0, 1, 1, 2, 2, 3, 3, 0};
  CHECK(load_balancing(Pu, Iu, {}, 4, 4, 2, alpha).value == Approx(alpha * 1.0).epsilon(1e-14));

  // Everything on expert 0 with P concentrated there: T = 2, E = 2, k = 1,
  // f = (1, 0), pbar = (1, 0): L = alpha * 2 * 1 = 2 alpha.
  CHECK(load_balancing({1, 0, 1, 0}, {0, 0}, {}, 2, 2, 1, alpha).value == Approx(2.0 * alpha).epsilon(1e-14));

  // A dropped slot lowers f (configured k in the denominator): T = 1, E = 2, k = 2,
  // I = (0, -1), P = (0.5, 0.5): f = (1/2, 0), pbar = (1/2, 1/2), L = alpha * 2 * 1/4.
  CHECK(load_balancing({0.5, 0.5}, {0, -1}, {}, 1, 2, 2, alpha).value == Approx(alpha * 0.5).epsilon(1e-14));
}

TEST_CASE("reference load balancing, sequence scope", "[reference]") {
  problem pr(2);
  const double alpha = 0.9;
  const ivec cu{0, 2, 2, 6};  // three sequences, the middle one empty
  auto f = [&](const vec& P) { return load_balancing_seq(P, pr.I, pr.mask, pr.T, pr.E, pr.k, alpha, cu).value; };
  const result r = load_balancing_seq(pr.P, pr.I, pr.mask, pr.T, pr.E, pr.k, alpha, cu);
  check_gradient(f, pr.P, r.grad, "load_balancing_seq");

  // L = (1/B) sum_b L_micro(sequence b), B = 3 including the empty sequence.
  auto slice = [](const auto& v, long long a, long long b, long long w) {
    using V = std::decay_t<decltype(v)>;
    return V(v.begin() + a * w, v.begin() + b * w);
  };
  const double l0 =
      load_balancing(slice(pr.P, 0, 2, pr.E), slice(pr.I, 0, 2, pr.k), slice(pr.mask, 0, 2, 1), 2, pr.E, pr.k, alpha)
          .value;
  const double l2 =
      load_balancing(slice(pr.P, 2, 6, pr.E), slice(pr.I, 2, 6, pr.k), slice(pr.mask, 2, 6, 1), 4, pr.E, pr.k, alpha)
          .value;
  CHECK(r.value == Approx((l0 + 0.0 + l2) / 3.0).epsilon(1e-13));

  // One sequence spanning the batch equals the micro-batch scope.
  const result one = load_balancing_seq(pr.P, pr.I, pr.mask, pr.T, pr.E, pr.k, alpha, {0, pr.T});
  const result micro = load_balancing(pr.P, pr.I, pr.mask, pr.T, pr.E, pr.k, alpha);
  CHECK(one.value == Approx(micro.value).epsilon(1e-14));
  for (std::size_t i = 0; i < one.grad.size(); ++i) CHECK(one.grad[i] == Approx(micro.grad[i]).epsilon(1e-14));

  // Fixed length S = 3 written as offsets 0, 3, 6.
  const result fixed = load_balancing_seq(pr.P, pr.I, pr.mask, pr.T, pr.E, pr.k, alpha, {0, 3, 6});
  auto ff = [&](const vec& P) {
    return load_balancing_seq(P, pr.I, pr.mask, pr.T, pr.E, pr.k, alpha, {0, 3, 6}).value;
  };
  check_gradient(ff, pr.P, fixed.grad, "load_balancing_seq fixed S");
}

TEST_CASE("reference z-loss", "[reference]") {
  problem pr(3);
  const double beta = 0.8;
  auto f = [&](const vec& Z) { return z_loss(Z, pr.mask, pr.T, pr.E, beta).value; };
  const result r = z_loss(pr.Z, pr.mask, pr.T, pr.E, beta);
  check_gradient(f, pr.Z, r.grad, "z_loss");

  // Z = 0, E = 5: lse = log 5, L = beta (log 5)^2.
  CHECK(z_loss(vec(10, 0.0), {}, 2, 5, beta).value == Approx(beta * std::log(5.0) * std::log(5.0)).epsilon(1e-14));
  // Stable for |Z| = 1e4: lse = 1e4 + log(1 + e^{-2e4}) = 1e4.
  const result big = z_loss({1e4, -1e4}, {}, 1, 2, 1.0);
  CHECK(std::isfinite(big.value));
  CHECK(big.value == Approx(1e8).epsilon(1e-14));
  CHECK(big.grad[0] == Approx(2e4).epsilon(1e-14));
  CHECK(big.grad[1] == 0.0);
}

TEST_CASE("reference specialization", "[reference]") {
  problem pr(4);
  const double lambda = 0.6;
  for (bool mean : {false, true}) {
    for (double eps : {1e-8, 1e-3}) {
      auto f = [&](const vec& H) {
        return specialization(H, pr.I, pr.mask, pr.T, pr.k, pr.d, lambda, mean, eps).value;
      };
      const result r = specialization(pr.H, pr.I, pr.mask, pr.T, pr.k, pr.d, lambda, mean, eps);
      check_gradient(f, pr.H, r.grad,
                     std::string("specialization pairs=") + (mean ? "mean" : "sum") + " eps=" + std::to_string(eps));
      // zero vector, dropped slot and padded token get zero gradient
      for (long long q = 0; q < pr.d; ++q) {
        CHECK(r.grad[static_cast<std::size_t>((1 * pr.k + 0) * pr.d + q)] == 0.0);
        CHECK(r.grad[static_cast<std::size_t>((4 * pr.k + 1) * pr.d + q)] == 0.0);
        CHECK(r.grad[static_cast<std::size_t>((2 * pr.k + 0) * pr.d + q)] == 0.0);
      }
    }
  }

  // Two identical vectors, one token: c = 1 for both ordered pairs -> lambda * 2 (sum),
  // lambda * 2 / (2 * 1) = lambda (mean).
  const vec same{1, 2, 3, 1, 2, 3};
  CHECK(specialization(same, {0, 1}, {}, 1, 2, 3, lambda, false, 1e-8).value == Approx(2.0 * lambda).epsilon(1e-14));
  CHECK(specialization(same, {0, 1}, {}, 1, 2, 3, lambda, true, 1e-8).value == Approx(lambda).epsilon(1e-14));
  // Orthogonal vectors give 0.
  CHECK(specialization({1, 0, 0, 0, 2, 0}, {0, 1}, {}, 1, 2, 3, lambda, false, 1e-8).value == 0.0);
  // Opposite vectors: c = -1, c^2 = 1.
  CHECK(specialization({1, 0, -3, 0}, {0, 1}, {}, 1, 2, 2, lambda, false, 1e-8).value ==
        Approx(2.0 * lambda).epsilon(1e-14));
  // Tiny norm (below eps): n = eps constant. h1 = (1e-9, 0), h2 = (1, 0), eps = 1e-8:
  // c = 1e-9 / (1e-8 * 1) = 0.1, L = lambda * 2 * 0.01.
  CHECK(specialization({1e-9, 0, 1, 0}, {0, 1}, {}, 1, 2, 2, lambda, false, 1e-8).value ==
        Approx(0.02 * lambda).epsilon(1e-12));
}

TEST_CASE("reference coupling", "[reference]") {
  std::mt19937 rng(5);
  const long long T = 6, E = 5;
  const ivec k{2, 3, 2};
  const mvec mask{1, 0, 1, 1, 1, 1};
  std::vector<vec> P;
  std::vector<ivec> I;
  for (std::size_t l = 0; l < k.size(); ++l) {
    P.push_back(row_softmax(random_vec(rng, static_cast<std::size_t>(T * E), -2.0, 2.0), T, E));
    I.push_back(random_topk(rng, T, E, k[l]));
  }
  I[1][static_cast<std::size_t>(3 * k[1] + 2)] = -1;  // a dropped slot in layer 2
  const double lambda = 0.9;
  for (const std::string form : {"token", "log", "batch"}) {
    const double eps = 1e-12;
    const auto r = coupling(P, I, k, mask, T, E, lambda, form, eps);
    REQUIRE(r.second.size() == 3);
    for (std::size_t l = 0; l < P.size(); ++l) {
      auto f = [&](const vec& Pl) {
        std::vector<vec> Q = P;
        Q[l] = Pl;
        return coupling(Q, I, k, mask, T, E, lambda, form, eps).first;
      };
      check_gradient(f, P[l], r.second[l], "coupling " + form + " layer " + std::to_string(l));
      for (long long e = 0; e < E; ++e) CHECK(r.second[l][static_cast<std::size_t>(1 * E + e)] == 0.0);
    }
  }

  // token form by hand: one token, two layers, selected masses 0.5 and 0.8:
  // L = -lambda * 0.5 * 0.8 = -0.4 lambda.
  const std::vector<vec> P2{{0.3, 0.2, 0.5}, {0.1, 0.1, 0.8}};
  const std::vector<ivec> I2{{0, 1}, {2, -1}};
  const auto h = coupling(P2, I2, {2, 2}, {}, 1, 3, lambda, "token", 1e-12);
  CHECK(h.first == Approx(-0.4 * lambda).epsilon(1e-14));
  // gradient: layer 1 selected entries get -lambda * M^2 = -0.8 lambda, layer 2 entry 2 gets -0.5 lambda
  CHECK(h.second[0][0] == Approx(-0.8 * lambda));
  CHECK(h.second[0][2] == 0.0);
  CHECK(h.second[1][2] == Approx(-0.5 * lambda));
  CHECK(h.second[1][0] == 0.0);
  CHECK(coupling(P2, I2, {2, 2}, {}, 1, 3, lambda, "log", 0.0).first == Approx(-lambda * std::log(0.4)));
  // batch form by hand: J = P1^T P2 (one token); k_1 = 1: for each e the largest entry
  // is at nu = 2, so L = -lambda * sum_e P1[e] * 0.8 = -0.8 lambda.
  CHECK(coupling(P2, {{2}, {2, -1}}, {1, 2}, {}, 1, 3, lambda, "batch", 0.0).first == Approx(-0.8 * lambda));
  // ties to the lower index: P2 = (0.4, 0.4, 0.2), k_1 = 1 selects nu = 0 for every e;
  // value is the same either way, the gradient to layer 2 lands on expert 0 only.
  const auto tie = coupling({{0.5, 0.5, 0.0}, {0.4, 0.4, 0.2}}, {{0}, {0, 1}}, {1, 2}, {}, 1, 3, 1.0, "batch", 0.0);
  CHECK(tie.first == Approx(-0.4));
  CHECK(tie.second[1][0] == Approx(-1.0));
  CHECK(tie.second[1][1] == 0.0);
}

TEST_CASE("reference orthogonality", "[reference]") {
  problem pr(6);
  const double beta = 0.7;
  for (const std::string variant : {"pairwise", "subspace"}) {
    for (bool rsum : {false, true}) {
      for (double eps : {1e-6, 1e-2}) {
        auto f = [&](const vec& H) {
          return orthogonality(H, pr.I, pr.mask, pr.T, pr.k, pr.d, beta, rsum, variant, eps).value;
        };
        const result r = orthogonality(pr.H, pr.I, pr.mask, pr.T, pr.k, pr.d, beta, rsum, variant, eps);
        check_gradient(f, pr.H, r.grad,
                       "orthogonality " + variant + (rsum ? " sum" : " mean") + " eps=" + std::to_string(eps));
        for (long long q = 0; q < pr.d; ++q) {
          CHECK(r.grad[static_cast<std::size_t>((4 * pr.k + 1) * pr.d + q)] == 0.0);
          CHECK(r.grad[static_cast<std::size_t>((2 * pr.k + 0) * pr.d + q)] == 0.0);
        }
      }
    }
  }

  // Subspace with k = 4 (X has up to 3 columns), d = 6.
  {
    std::mt19937 rng(7);
    const long long T = 5, k = 4, d = 6;
    ivec I = random_topk(rng, T, 5, k);
    I[static_cast<std::size_t>(2 * k + 3)] = -1;
    const mvec mask{1, 1, 1, 0, 1};
    const vec H = random_vec(rng, static_cast<std::size_t>(T * k * d), -1.0, 1.0);
    auto f = [&](const vec& Hx) { return orthogonality(Hx, I, mask, T, k, d, beta, false, "subspace", 1e-6).value; };
    const result r = orthogonality(H, I, mask, T, k, d, beta, false, "subspace", 1e-6);
    check_gradient(f, H, r.grad, "orthogonality subspace k=4");
  }

  // Orthogonal vectors give 0 in both variants.
  const vec orth{1, 0, 0, 0, 2, 0, 0, 0, 3};
  CHECK(orthogonality(orth, {0, 1, 2}, {}, 1, 3, 3, beta, false, "pairwise", 1e-6).value == 0.0);
  CHECK(orthogonality(orth, {0, 1, 2}, {}, 1, 3, 3, beta, false, "subspace", 1e-6).value == 0.0);
  // h1 = (1, 0), h2 = (1, 1), eps = 0, pairwise:
  //   term(j=1,s=2) = <h1,h2>^2 ||h2||^2 / ||h2||^4 = 1 * 2 / 4 = 0.5
  //   term(j=2,s=1) = 1 * 1 / 1 = 1            total 1.5 beta
  const vec two{1, 0, 1, 1};
  CHECK(orthogonality(two, {0, 1}, {}, 1, 2, 2, beta, false, "pairwise", 0.0).value == Approx(1.5 * beta));
  // subspace, eps = 0: ||proj of h1 on h2||^2 = 0.5, ||proj of h2 on h1||^2 = 1, times 1/k = 1/2: 0.75 beta
  CHECK(orthogonality(two, {0, 1}, {}, 1, 2, 2, beta, false, "subspace", 0.0).value == Approx(0.75 * beta));
  // subspace, k = 3 with 3 vectors spanning R^2 plus ... : h3 in span(h1, h2) projects onto itself.
  // h1 = (1,0), h2 = (0,1), h3 = (1,1): terms 1 (h1 onto span(h2,h3) = R^2), 1, 2 -> (1+1+2)/3 beta
  CHECK(orthogonality({1, 0, 0, 1, 1, 1}, {0, 1, 2}, {}, 1, 3, 2, beta, false, "subspace", 0.0).value ==
        Approx(4.0 / 3.0 * beta));
  // reduction: T_v = 2 tokens, the mean halves the sum
  const vec two2{1, 0, 1, 1, 1, 0, 1, 1};
  CHECK(orthogonality(two2, {0, 1, 0, 1}, {}, 2, 2, 2, beta, true, "pairwise", 0.0).value == Approx(3.0 * beta));
  CHECK(orthogonality(two2, {0, 1, 0, 1}, {}, 2, 2, 2, beta, false, "pairwise", 0.0).value == Approx(1.5 * beta));
}

TEST_CASE("reference variance", "[reference]") {
  problem pr(8);
  const double gamma = 0.9;
  for (const std::string axis : {"tokens", "experts"}) {
    for (bool rsum : {false, true}) {
      auto f = [&](const vec& S) { return variance(S, pr.mask, pr.T, pr.E, gamma, axis, rsum).value; };
      const result r = variance(pr.P, pr.mask, pr.T, pr.E, gamma, axis, rsum);
      check_gradient(f, pr.P, r.grad, "variance " + axis + (rsum ? " sum" : " mean"));
    }
  }
  // S = [[1,0],[0,1]]: sbar = (1/2, 1/2), sum (S - sbar)^2 = 1,
  // tokens: L = -gamma * (1/2) * (1/2) * 1 = -gamma/4; sum reduction: -gamma/2.
  // experts: var_unbiased([1,0]) = 1/2 per row -> L = -gamma/2; sum reduction: -gamma.
  const vec S{1, 0, 0, 1};
  CHECK(variance(S, {}, 2, 2, gamma, "tokens", false).value == Approx(-gamma / 4));
  CHECK(variance(S, {}, 2, 2, gamma, "tokens", true).value == Approx(-gamma / 2));
  CHECK(variance(S, {}, 2, 2, gamma, "experts", false).value == Approx(-gamma / 2));
  CHECK(variance(S, {}, 2, 2, gamma, "experts", true).value == Approx(-gamma));
  CHECK(variance({0.3, 0.7}, {}, 2, 1, gamma, "experts", false).value == 0.0);
}

TEST_CASE("reference entropy and importance", "[reference]") {
  problem pr(9);
  const double eta = 0.8, w = 0.6;
  auto fe = [&](const vec& P) { return entropy(P, pr.mask, pr.T, pr.E, eta).value; };
  const result re = entropy(pr.P, pr.mask, pr.T, pr.E, eta);
  check_gradient(fe, pr.P, re.grad, "entropy");
  // uniform P: L = eta log E
  CHECK(entropy(vec(10, 0.2), {}, 2, 5, eta).value == Approx(eta * std::log(5.0)).epsilon(1e-14));
  // p = 0 is handled: value term 0, derivative -log(tiny) / T_v
  const result z = entropy({1.0, 0.0}, {}, 1, 2, eta);
  CHECK(z.value == 0.0);
  CHECK(z.grad[0] == Approx(-eta));
  CHECK(z.grad[1] == Approx(-eta * std::log(1e-30)));

  auto fi = [&](const vec& P) { return importance(P, pr.mask, pr.T, pr.E, w).value; };
  const result ri = importance(pr.P, pr.mask, pr.T, pr.E, w);
  check_gradient(fi, pr.P, ri.grad, "importance");
  // imp = (2, 0): mu = 1, var = 1 -> L = w
  CHECK(importance({1, 0, 1, 0}, {}, 2, 2, w).value == Approx(w));
  CHECK(importance(vec(4, 0.5), {}, 2, 2, w).value == 0.0);
  const result zero = importance(vec(4, 0.0), {}, 2, 2, w);
  CHECK(zero.value == 0.0);
  for (double g : zero.grad) CHECK(g == 0.0);
}

TEST_CASE("reference bias update", "[reference]") {
  // counts (1, 3, 2): mean 2 -> signs (+1, -1, 0)
  const vec b{0.5, 0.5, 1.0};
  const vec nb = bias_update(b, {1, 3, 2}, 0.1, false);
  CHECK(nb[0] == Approx(0.6));
  CHECK(nb[1] == Approx(0.4));
  CHECK(nb[2] == Approx(1.0));
  const vec cb = bias_update(b, {1, 3, 2}, 0.1, true);  // mean of (0.6, 0.4, 1.0) = 2/3
  CHECK(cb[0] == Approx(0.6 - 2.0 / 3.0));
  CHECK(cb[1] == Approx(0.4 - 2.0 / 3.0));
  CHECK(cb[2] == Approx(1.0 - 2.0 / 3.0));
}

TEST_CASE("reference chain helpers", "[reference]") {
  std::mt19937 rng(10);
  const long long T = 5, E = 5;
  const vec Z = random_vec(rng, static_cast<std::size_t>(T * E), -2.0, 2.0);
  const vec up = random_vec(rng, static_cast<std::size_t>(T * E), -1.0, 1.0);
  auto fs = [&](const vec& z) {
    const vec P = row_softmax(z, T, E);
    double s = 0.0;
    for (std::size_t i = 0; i < P.size(); ++i) s += up[i] * P[i];
    return s;
  };
  check_gradient(fs, Z, softmax_backward(row_softmax(Z, T, E), up, T, E), "softmax_backward");

  auto fsig = [&](const vec& z) {
    double s = 0.0;
    for (long long t = 0; t < T; ++t) {
      double tot = 0.0;
      for (long long e = 0; e < E; ++e) tot += 1.0 / (1.0 + std::exp(-z[static_cast<std::size_t>(t * E + e)]));
      for (long long e = 0; e < E; ++e) {
        const std::size_t i = static_cast<std::size_t>(t * E + e);
        s += up[i] / (1.0 + std::exp(-z[i])) / tot;
      }
    }
    return s;
  };
  check_gradient(fsig, Z, sigmoid_norm_backward(Z, up, T, E), "sigmoid_norm_backward");
}

TEST_CASE("reference metrics", "[reference]") {
  // T = 4 (token 3 padded), E = 3, k = 2, d = 2.
  const vec P{0.5, 0.3, 0.2,  //
              0.6, 0.2, 0.2,  //
              0.1, 0.1, 0.8,  //
              0.3, 0.3, 0.4};
  const ivec I{0, 1, 0, -1, 2, 0, 1, 2};
  const mvec mask{1, 1, 1, 0};
  const vec H{1, 0, 1, 1,   // token 0: cos = 1/sqrt2
              1, 0, 5, 5,   // token 1: slot 1 dropped
              0, 2, 3, 0,   // token 2: cos = 0
              1, 1, 1, 1};  // padded
  const layer_metrics lm = metrics(P, I, mask, 4, 3, 2, &H, 2);
  // counts: expert 0 <- tokens 0, 1, 2 = 3; expert 1 <- token 0 = 1; expert 2 <- token 2 = 1
  CHECK(lm.tokens_per_expert == vec{3, 1, 1});
  CHECK(lm.f[0] == Approx(3.0 / 6.0));
  CHECK(lm.f[1] == Approx(1.0 / 6.0));
  // mean count 5/3: maxvio = 3 / (5/3) - 1 = 0.8
  CHECK(lm.maxvio == Approx(0.8));
  // population std: deviations (4/3, -2/3, -2/3), var = (16+4+4)/27 = 8/9, cv = sqrt(8/9)/(5/3)
  CHECK(lm.cv == Approx(std::sqrt(8.0 / 9.0) / (5.0 / 3.0)));
  // top-k mass: 0.8, 0.6, 0.9 -> mean 2.3/3
  CHECK(lm.mean_topk_mass == Approx(2.3 / 3.0));
  double ent = 0.0;
  for (int t = 0; t < 3; ++t)
    for (int e = 0; e < 3; ++e)
      ent -= P[static_cast<std::size_t>(t * 3 + e)] * std::log(P[static_cast<std::size_t>(t * 3 + e)]);
  CHECK(lm.mean_entropy == Approx(ent / 3.0));
  // pairs: token 0 (cos 1/sqrt2), token 2 (cos 0)
  CHECK(lm.mean_abs_cos == Approx(1.0 / std::sqrt(2.0) / 2.0));
  CHECK(lm.mean_cos2 == Approx(0.25));
  const layer_metrics noh = metrics(P, I, mask, 4, 3, 2, nullptr, 0);
  CHECK(noh.mean_abs_cos == 0.0);

  // Pair metrics, E = 2, k = 1 both layers, 4 tokens: (0->0), (0->0), (1->1), (1->0).
  const ivec Ia{0, 0, 1, 1}, Ib{0, 0, 1, 0};
  const pair_metrics_result pm = pair_metrics(Ia, Ib, {}, 4, 2, 1, 1);
  CHECK(pm.joint == vec{0.5, 0.0, 0.25, 0.25});
  // rows (1/2, 1/2), cols (3/4, 1/4):
  // MI = 1/2 log(1/2 / (3/8)) + 1/4 log(1/4 / (3/8)) + 1/4 log(1/4 / (1/8))
  const double mi = 0.5 * std::log(4.0 / 3.0) + 0.25 * std::log(2.0 / 3.0) + 0.25 * std::log(2.0);
  CHECK(pm.mutual_information == Approx(mi));
  // top-1 successor: e=0 -> nu=0 (2 of 2), e=1 -> tie (1,1) -> nu=0 (1): share 3/4
  CHECK(pm.pathway_concentration == Approx(0.75));
  // independent routing: MI = 0
  const pair_metrics_result ind = pair_metrics({0, 0, 1, 1}, {0, 1, 0, 1}, {}, 4, 2, 1, 1);
  CHECK(ind.mutual_information == Approx(0.0).margin(1e-15));
  CHECK(ind.pathway_concentration == Approx(0.5));
}

TEST_CASE("reference: T_v = 0 gives 0 and zero gradients", "[reference]") {
  problem pr(11);
  const mvec none(static_cast<std::size_t>(pr.T), 0);
  auto all_zero = [](const vec& g) {
    for (double x : g)
      if (x != 0.0) return false;
    return true;
  };
  auto check = [&](const result& r) {
    CHECK(r.value == 0.0);
    CHECK(all_zero(r.grad));
  };
  check(load_balancing(pr.P, pr.I, none, pr.T, pr.E, pr.k, 1.0));
  check(load_balancing_seq(pr.P, pr.I, none, pr.T, pr.E, pr.k, 1.0, {0, 3, 6}));
  check(z_loss(pr.Z, none, pr.T, pr.E, 1.0));
  check(specialization(pr.H, pr.I, none, pr.T, pr.k, pr.d, 1.0, false, 1e-8));
  check(orthogonality(pr.H, pr.I, none, pr.T, pr.k, pr.d, 1.0, false, "pairwise", 1e-6));
  check(orthogonality(pr.H, pr.I, none, pr.T, pr.k, pr.d, 1.0, true, "subspace", 1e-6));
  check(variance(pr.P, none, pr.T, pr.E, 1.0, "tokens", false));
  check(variance(pr.P, none, pr.T, pr.E, 1.0, "experts", true));
  check(entropy(pr.P, none, pr.T, pr.E, 1.0));
  check(importance(pr.P, none, pr.T, pr.E, 1.0));
  const auto c = coupling({pr.P, pr.P}, {pr.I, pr.I}, {pr.k, pr.k}, none, pr.T, pr.E, 1.0, "batch", 1e-12);
  CHECK(c.first == 0.0);
  CHECK(all_zero(c.second[0]));
  CHECK(all_zero(c.second[1]));
  // empty batch
  check(load_balancing({}, {}, {}, 0, pr.E, pr.k, 1.0));
  check(z_loss({}, {}, 0, pr.E, 1.0));
  const layer_metrics lm = metrics(pr.P, pr.I, none, pr.T, pr.E, pr.k, &pr.H, pr.d);
  CHECK(lm.maxvio == 0.0);
  CHECK(lm.mean_entropy == 0.0);
  CHECK(all_zero(lm.tokens_per_expert));
}

TEST_CASE("reference rejects malformed input", "[reference]") {
  CHECK_THROWS_AS(load_balancing({0.5, 0.5}, {2}, {}, 1, 2, 1, 1.0), std::invalid_argument);     // index >= E
  CHECK_THROWS_AS(load_balancing({0.5, 0.5}, {0, 0}, {}, 1, 2, 2, 1.0), std::invalid_argument);  // duplicate
  CHECK_THROWS_AS(z_loss({0.5, 0.5}, {1, 1}, 1, 2, 1.0), std::invalid_argument);                 // mask length
}
