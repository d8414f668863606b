// The demo network of examples/text_moe: its analytic backward (task loss and every
// regulariser, carried through softmax_backward, the top-k renormalisation, the mixing layer
// and the embedding table) against finite differences in double with the routing selection
// held fixed; the fortune loader's splitting, hashing and balancing on files written here;
// the prefetch measure on hand-made routings; and a short training run that learns.
#include <catch2/catch.hpp>

#include <cmath>
#include <cstdio>
#include <filesystem>
#include <fstream>
#include <random>
#include <set>
#include <string>
#include <vector>

#include <moereg/testing/gradcheck.hpp>

#include "../../examples/text_moe/text_moe.hpp"

namespace {

namespace fs = std::filesystem;

text_moe::model_config small_model(text_moe::index_t layers, text_moe::index_t k) {
  text_moe::model_config mc;
  mc.vocab = 256;
  mc.window = 3;
  mc.embed = 2;
  mc.dim = 5;
  mc.experts = 4;
  mc.top_k = k;
  mc.hidden = 3;
  mc.layers = layers;
  return mc;
}

// A batch of random bytes from a small alphabet (so that embedding rows are shared between
// positions and tokens), with random languages.
text_moe::batch random_batch(std::mt19937_64& g, text_moe::index_t n, text_moe::index_t window) {
  text_moe::batch b;
  b.window = window;
  std::uniform_int_distribution<int> byte(60, 66), lang(0, 6);
  for (text_moe::index_t i = 0; i < n; ++i) {
    for (text_moe::index_t j = 0; j < window; ++j) b.context.push_back(static_cast<std::uint8_t>(byte(g)));
    b.target.push_back(byte(g));
    b.lang.push_back(lang(g));
    ++b.size;
  }
  return b;
}

// A fortunes folder with two languages' worth of files (and the things the loader must skip).
struct fake_fortunes {
  fs::path root;
  explicit fake_fortunes(const std::string& tag) {
    // A name of its own per process, so that two test runs at the same time do not collide.
    root = fs::temp_directory_path() / ("moereg_text_moe_" + tag + "_" + std::to_string(std::random_device{}()));
    fs::remove_all(root);
    for (const char* d : {"de", "es", "it", "cs", "pl", "ru", "es/off"}) fs::create_directories(root / d);
    write("en_file", "one\n%\ntwo two\n%\nthree three three\n%\n");
    write("en_file.dat", "binary index");
    write("en_file.u8", "");
    write("de/witze", "eins\n%\nzwei zwei\n%\n");
    write("es/refranes", "uno\n%\ndos dos\n%\n");
    write("es/off/misogino", "OFFENSIVE\n%\n");
    write("it/leggi", "uno\n%\n");
    write("cs/citace", "jedna\n%\n");
    write("cs/klasik-sk", "SLOVAK\n%\n");
    write("pl/pld", "jeden\n%\ndwa dwa\n%\njeden\n%\n");  // a duplicate, kept once
    write("ru/life", "odin\n%\n");
    fs::create_symlink(root / "de" / "witze", root / "de" / "link");
  }
  ~fake_fortunes() {
    std::error_code ec;
    fs::remove_all(root, ec);
  }
  void write(const std::string& rel, const std::string& text) const {
    std::ofstream(root / rel, std::ios::binary) << text;
  }
};

}  // namespace

TEST_CASE("text_moe: the analytic gradient matches finite differences with the selection fixed", "[text_moe]") {
  struct reg_case {
    const char* name;
    text_moe::reg_config reg;
  };
  const std::vector<reg_case> cases = {
      {"task only", {}},
      {"load balancing", {0.2, 0, 0, 0, 0, 0}},
      {"specialization", {0, 0.3, 0, 0, 0, 0}},
      {"coupling", {0, 0, 0.25, 0, 0, 0}},
      {"orthogonality", {0, 0, 0, 0.15, 0, 0}},
      {"variance", {0, 0, 0, 0, 0.35, 0}},
      {"z-loss", {0, 0, 0, 0, 0, 0.05}},
      {"all", {0.2, 0.3, 0.25, 0.15, 0.35, 0.05}},
  };
  for (const auto& shape : {std::pair<long, long>{3, 2}, std::pair<long, long>{2, 3}}) {
    const auto mc = small_model(shape.first, shape.second);
    const text_moe::param_layout pl(mc);
    std::mt19937_64 g(3 + static_cast<std::uint64_t>(shape.first));
    const text_moe::batch b = random_batch(g, 7, mc.window);
    // Larger weights than the training initialisation, so that routing is far from uniform
    // and every term has a sizeable gradient. Only the parameters the batch reaches are
    // checked one by one (the other embedding and output rows have exact zeros or a known
    // gradient); the full check covers them with random directions.
    const auto x0 = text_moe::init_params<double>(pl, 11);
    std::vector<double> x(x0.begin(), x0.end());
    std::normal_distribution<double> nd(0.0, 0.25);
    for (auto& v : x) v += nd(g);

    // Hold the selection fixed at the one of x, with one slot dropped (capacity overflow).
    const auto fc0 = text_moe::forward(pl, x.data(), b);
    std::vector<std::vector<std::int32_t>> fixed;
    for (const auto& L : fc0.layers) fixed.push_back(L.topk);
    fixed[1][0] = -1;

    for (const auto& c : cases) {
      INFO("layers " << shape.first << ", k " << shape.second << ", " << c.name);
      std::vector<double> grad(x.size());
      const auto fc = text_moe::forward(pl, x.data(), b, &fixed);
      const auto terms = text_moe::objective(pl, x.data(), b, fc, c.reg, grad.data());
      const bool any_reg = c.reg.load_balancing + c.reg.specialization + c.reg.coupling + c.reg.orthogonality +
                               c.reg.variance + c.reg.z !=
                           0.0;
      INFO("task loss " << terms.task);
      CHECK(terms.task < 30.0);  // no output probability near underflow, where the log is clamped
      CHECK((terms.total() != terms.task) == any_reg);  // each switched-on term contributes
      auto f = [&](const double* p) {
        const auto fx = text_moe::forward(pl, p, b, &fixed);
        return text_moe::objective(pl, p, b, fx, c.reg).total();
      };
      moereg::testing::gradcheck_options opt;
      opt.full_max = 1 << 20;  // every coordinate (about 3000)
      const auto rep = moereg::testing::gradcheck(f, x, grad, opt);
      INFO(rep.summary());
      CHECK(rep.ok);
      CHECK(rep.checked == static_cast<moereg::index_t>(x.size()));
    }
  }
}

TEST_CASE("text_moe: parameter blocks are aligned and the padding gets no gradient", "[text_moe]") {
  const auto mc = small_model(2, 2);
  const text_moe::param_layout pl(mc);
  for (auto off : {pl.emb, pl.mix_w, pl.mix_b, pl.out_w, pl.out_b}) CHECK(off % text_moe::param_layout::align == 0);
  for (auto off : pl.w_gate) CHECK(off % text_moe::param_layout::align == 0);
  CHECK(pl.expert_stride % text_moe::param_layout::align == 0);
  const auto p = text_moe::init_params<float>(pl, 1);
  CHECK(reinterpret_cast<std::uintptr_t>(p.data()) % 16 == 0);
  std::mt19937_64 g(2);
  const auto b = random_batch(g, 9, mc.window);
  const auto fc = text_moe::forward(pl, p.data(), b);
  text_moe::buffer<float> grad(p.size(), 1.0f);
  text_moe::objective(pl, p.data(), b, fc, text_moe::reg_config{1e-2, 2e-3, 1e-3, 1e-4, 1e-3, 0}, grad.data());
  // Between the end of the mixing bias and the first router block lies padding.
  for (auto i = pl.mix_b + mc.dim; i < pl.router[0]; ++i) CHECK(grad[static_cast<std::size_t>(i)] == 0.0f);
  // Two identical forward and backward passes give bitwise the same gradient.
  text_moe::buffer<float> again(p.size());
  const auto fc2 = text_moe::forward(pl, p.data(), b);
  text_moe::objective(pl, p.data(), b, fc2, text_moe::reg_config{1e-2, 2e-3, 1e-3, 1e-4, 1e-3, 0}, again.data());
  CHECK(grad == again);
}

TEST_CASE("text_moe: fortunes split at % lines, whole fortunes per side, offensive and Slovak files skipped",
          "[text_moe]") {
  const auto parts = text_moe::split_fortunes("a\nb\n%\n\n%\nc\n%\nd");
  REQUIRE(parts.size() == 3);
  CHECK(parts[0] == "a\nb\n");
  CHECK(parts[1] == "c\n");
  CHECK(parts[2] == "d");

  const fake_fortunes ff("loader");
  const auto ds = text_moe::load_fortunes(ff.root.string(), 4, /*heldout_mod=*/2);
  CHECK(ds.files == std::vector<std::int64_t>{1, 1, 1, 1, 1, 1, 1});  // no .dat, .u8, link, off/, klasik-sk
  CHECK(ds.raw_fortunes[5] == 2);                                     // the Polish duplicate once
  for (const auto* c : {&ds.train, &ds.heldout}) {
    REQUIRE(c->bytes.size() == c->lang.size());
    std::string text(c->bytes.begin(), c->bytes.end());
    CHECK(text.find("OFFENSIVE") == std::string::npos);
    CHECK(text.find("SLOVAK") == std::string::npos);
    // Each target position holds a text byte of its language, with its whole context window
    // inside the buffer.
    for (std::size_t l = 0; l < c->positions.size(); ++l)
      for (auto pos : c->positions[l]) {
        CHECK(pos >= 4);
        CHECK(c->lang[static_cast<std::size_t>(pos)] == l);
        CHECK(c->bytes[static_cast<std::size_t>(pos)] != 0);
      }
  }
  // No fortune is on both sides: the hash decides.
  for (const auto& fo : {std::string("one\n"), std::string("two two\n"), std::string("three three three\n")}) {
    const bool held = text_moe::fnv1a(fo) % 2 == 0;
    const std::string tr(ds.train.bytes.begin(), ds.train.bytes.end()),
        he(ds.heldout.bytes.begin(), ds.heldout.bytes.end());
    const std::string z(4, '\0');
    const bool in_train = tr.find(z + fo + z) != std::string::npos, in_held = he.find(z + fo + z) != std::string::npos;
    CHECK(!(in_train && in_held));
    if (in_train || in_held) CHECK(in_held == held);
  }
  // The loader names the missing package.
  fs::remove_all(ff.root / "ru");
  try {
    (void)text_moe::load_fortunes(ff.root.string(), 4, 2);
    FAIL("no error without Russian files");
  } catch (const std::runtime_error& e) {
    CHECK(std::string(e.what()).find("fortunes-ru") != std::string::npos);
  }
}

TEST_CASE("text_moe: samples carry their context and language", "[text_moe]") {
  const fake_fortunes ff("samples");
  const auto ds = text_moe::load_fortunes(ff.root.string(), 3, 1000003);  // (almost) everything in training
  std::mt19937_64 g(5);
  const auto b = text_moe::sample_uniform(ds.train, g, 200);
  REQUIRE(b.size == 200);
  for (text_moe::index_t i = 0; i < b.size; ++i) {
    CHECK(b.target[static_cast<std::size_t>(i)] != 0);
    CHECK(b.lang[static_cast<std::size_t>(i)] < 7);
  }
  // The first byte of a fortune has an all-zero context.
  const auto& pos = ds.train.positions[0];
  REQUIRE(!pos.empty());
  text_moe::batch one;
  one.window = 3;
  text_moe::add_sample(ds.train, pos[0], one);
  CHECK(one.context == std::vector<std::uint8_t>{0, 0, 0});
}

TEST_CASE("text_moe: prefetch hit rate and successor tables on hand-made routings", "[text_moe]") {
  // Layer 1 picks {0,1} or {2,3}; layer 2 follows: {0,1} -> {4,5}, {2,3} -> {6,7}.
  std::vector<std::int32_t> a, bsel;
  for (int t = 0; t < 8; ++t) {
    const bool odd = t % 2 == 1;
    a.insert(a.end(), {odd ? 2 : 0, odd ? 3 : 1});
    bsel.insert(bsel.end(), {odd ? 6 : 4, odd ? 7 : 5});
  }
  const moereg::topk_view from(a.data(), 8, 2), to(bsel.data(), 8, 2);
  const auto pw = moereg::measure_pathways(from, 8, to, 8);
  const auto succ = text_moe::successors(pw, 2);
  CHECK(succ[0] == std::vector<text_moe::index_t>{4, 5});
  CHECK(succ[3] == std::vector<text_moe::index_t>{6, 7});
  CHECK(text_moe::prefetch_hit_rate(from, to, succ, 8) == 1.0);
  CHECK(text_moe::prefetch_hit_rate(from, to, succ, 8, 1) == 0.0);  // each token paired with the other kind
  CHECK(pw.pathway_concentration == 1.0);
}

TEST_CASE("text_moe: a short training run lowers the held-out loss", "[text_moe]") {
  const fake_fortunes ff("train");
  // Enough text to learn from: repeat a few fortunes per language (different texts, so that
  // the duplicate filter keeps them).
  for (const char* d : {"de/witze", "es/refranes", "it/leggi", "cs/citace", "pl/pld", "ru/life"}) {
    std::string t;
    for (int i = 0; i < 60; ++i) t += std::string(d) + " number " + std::to_string(i) + " says hello\n%\n";
    ff.write(d, t);
  }
  {
    std::string t;
    for (int i = 0; i < 60; ++i) t += "english number " + std::to_string(i) + " says hello\n%\n";
    ff.write("en_file", t);
  }
  const auto ds = text_moe::load_fortunes(ff.root.string(), 6, 5);
  text_moe::model_config mc;
  mc.window = 6;
  mc.embed = 4;
  mc.dim = 12;
  mc.experts = 4;
  mc.hidden = 8;
  mc.layers = 2;
  std::mt19937_64 g(99);
  const auto held = text_moe::sample_stratified(ds.heldout, g, 64);
  const auto probe = text_moe::sample_uniform(ds.train, g, 256);
  const text_moe::param_layout pl(mc);
  const auto x0 = text_moe::init_params<float>(pl, 1);
  const double before = text_moe::evaluate(pl, x0.data(), held, probe, 7, 2).bits_per_byte;
  text_moe::train_config trc;
  trc.steps = 150;
  trc.batch = 64;
  trc.warmup = 10;
  const text_moe::reg_config reg{1e-2, 2e-3, 1e-3, 1e-4, 1e-3, 0};
  const auto r = text_moe::train<float>(ds.train, mc, reg, trc, held, probe, 7, 2);
  INFO("held-out bits per byte before " << before << ", after " << r.eval.bits_per_byte);
  CHECK(r.eval.bits_per_byte < before - 2.0);
  CHECK(r.eval.maxvio >= 0.0);
  CHECK(r.eval.pathway > 0.0);
  CHECK(r.eval.pathway <= 1.0);
  CHECK(r.eval.prefetch >= 0.0);
  CHECK(r.eval.prefetch <= 1.0);
  REQUIRE(r.eval.lang_mi.size() == 2);
  CHECK(r.eval.lang_mi[0] >= 0.0);
  CHECK(r.eval.lang_mi[0] <= std::log(7.0) + 1e-12);
  // The same run again gives the same numbers (fixed seed, aligned buffers).
  const auto r2 = text_moe::train<float>(ds.train, mc, reg, trc, held, probe, 7, 2);
  CHECK(r2.eval.bits_per_byte == r.eval.bits_per_byte);
  CHECK(r2.eval.overlap_h == r.eval.overlap_h);
}
