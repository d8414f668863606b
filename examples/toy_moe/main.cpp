// toy_moe: trains the same small MoE (toy_moe.hpp) from the same seeds under four sets of
// regularisers and prints what the specialization losses do to the routing.
//
//   baseline     load balancing only (alpha = 1e-2)
//   +Hu          + specialization (lambda = 2e-3) + coupling (token form, lambda = 1e-3)
//   +Guo         + orthogonality (pairwise, beta = 1e-4) + variance (tokens axis, gamma = 1e-3)
//   all          every loss above
//
// The coefficients are the defaults of LOSSES.md (the papers' values), not tuned here.
// Usage: toy_moe [--quick] [--seeds N] [--steps N] [--jobs N] [--plot] [--out-dir DIR]
#include <atomic>
#include <chrono>
#include <cmath>
#include <cstdio>
#include <cstdlib>
#include <fstream>
#include <functional>
#include <iostream>
#include <sstream>
#include <string>
#include <thread>
#include <vector>

#include <Eigen/Core>

#include "toy_moe.hpp"

namespace {

struct named_config {
  std::string name;
  toy_moe::reg_config reg;
};

struct options {
  bool quick = false, plot = false;
  long seeds = 5, steps = -1, jobs = 2;
  std::string out_dir = ".";
};

void usage() {
  std::printf(
      "usage: toy_moe [--quick] [--seeds N] [--steps N] [--jobs N] [--plot] [--out-dir DIR]\n"
      "  --quick     a short run (fewer steps and seeds) for tests\n"
      "  --seeds N   seeds per configuration (default 5; 2 with --quick)\n"
      "  --steps N   training steps per run (default 1500; 200 with --quick)\n"
      "  --jobs N    runs trained at the same time, one thread each (default 2)\n"
      "  --plot      draw the held-out loss curves to toy_moe_curves.png with gnuplot\n"
      "  --out-dir   where toy_moe_results.csv, toy_moe_runs.csv and the curves go (default .)\n");
}

bool parse(int argc, char** argv, options& o) {
  for (int i = 1; i < argc; ++i) {
    const std::string a = argv[i];
    auto num = [&](long& dst) {
      if (i + 1 >= argc) return false;
      char* end = nullptr;
      dst = std::strtol(argv[++i], &end, 10);
      return end != nullptr && *end == '\0' && dst > 0;
    };
    if (a == "--quick") o.quick = true;
    else if (a == "--plot") o.plot = true;
    else if (a == "--seeds") { if (!num(o.seeds)) return false; }
    else if (a == "--steps") { if (!num(o.steps)) return false; }
    else if (a == "--jobs") { if (!num(o.jobs)) return false; }
    else if (a == "--out-dir" && i + 1 < argc) o.out_dir = argv[++i];
    else return false;
  }
  return true;
}

struct stat {
  double mean = 0, sd = 0;
};
stat summarise(const std::vector<double>& v) {
  stat s;
  if (v.empty()) return s;
  for (double x : v) s.mean += x;
  s.mean /= static_cast<double>(v.size());
  if (v.size() > 1) {
    for (double x : v) s.sd += (x - s.mean) * (x - s.mean);
    s.sd = std::sqrt(s.sd / static_cast<double>(v.size() - 1));  // sample standard deviation
  }
  return s;
}

struct column {
  const char* header;
  const char* csv;
  int decimals;
  std::function<double(const toy_moe::run_result&)> get;
};

std::string fmt(const stat& s, int decimals) {
  char buf[64];
  std::snprintf(buf, sizeof buf, "%.*f +- %.*f", decimals, s.mean, decimals, s.sd);
  return buf;
}

}  // namespace

int main(int argc, char** argv) {
  options opt;
  if (!parse(argc, argv, opt)) {
    usage();
    return 2;
  }
  if (opt.quick) {
    if (opt.steps < 0) opt.steps = 200;
    bool seeds_given = false;
    for (int i = 1; i < argc; ++i) seeds_given = seeds_given || std::string(argv[i]) == "--seeds";
    if (!seeds_given) opt.seeds = 2;
  }
  if (opt.steps < 0) opt.steps = 1500;
  Eigen::setNbThreads(1);  // one thread per run; runs go in parallel instead

  const toy_moe::task_config tcfg;
  const toy_moe::task tk(tcfg);
  toy_moe::model_config mc;
  mc.vocab = tk.vocab();
  mc.window = tcfg.window;
  toy_moe::train_config trc;
  trc.steps = opt.steps;
  if (opt.plot) trc.eval_every = std::max<long>(opt.steps / 30, 1);

  std::mt19937_64 hg(0xC0FFEE);
  const toy_moe::batch heldout = tk.sample(hg, 4096);
  const toy_moe::batch curve_batch = tk.sample(hg, 1024);
  const double bayes = tk.bayes_loss(heldout);

  const double lb = 1e-2, sp = 2e-3, cp = 1e-3, orth = 1e-4, var = 1e-3;  // LOSSES.md defaults
  const std::vector<named_config> configs = {
      {"baseline (LB)", {lb, 0, 0, 0, 0, 0}},
      {"+Hu (sp+cp)", {lb, sp, cp, 0, 0, 0}},
      {"+Guo (orth+var)", {lb, 0, 0, orth, var, 0}},
      {"all", {lb, sp, cp, orth, var, 0}},
  };
  const long S = opt.seeds, C = static_cast<long>(configs.size());

  std::printf("toy_moe: %ld topics, vocabulary %ld, context %ld tokens; model D = %ld, %ld layers x %ld SwiGLU experts "
              "(d_ff %ld), top-%ld\n",
              static_cast<long>(tcfg.topics), static_cast<long>(mc.vocab), static_cast<long>(mc.window),
              static_cast<long>(mc.dim), static_cast<long>(mc.layers), static_cast<long>(mc.experts),
              static_cast<long>(mc.hidden), static_cast<long>(mc.top_k));
  std::printf("training: %ld steps of %ld tokens, Adam lr %.0e; %ld seeds x %ld configurations, %ld at a time\n",
              static_cast<long>(trc.steps), static_cast<long>(trc.batch), trc.lr, S, C, opt.jobs);
  std::fflush(stdout);

  std::vector<toy_moe::run_result> results(static_cast<std::size_t>(S * C));
  std::atomic<long> next{0};
  const auto t0 = std::chrono::steady_clock::now();
  auto worker = [&]() {
    for (long j; (j = next.fetch_add(1)) < S * C;) {
      const long c = j % C, s = j / C;
      toy_moe::train_config tj = trc;
      tj.seed = static_cast<std::uint64_t>(1000 + s);
      results[static_cast<std::size_t>(j)] =
          toy_moe::train<float>(tk, mc, configs[static_cast<std::size_t>(c)].reg, tj, heldout, &curve_batch);
    }
  };
  std::vector<std::thread> pool;
  for (long i = 0; i < opt.jobs; ++i) pool.emplace_back(worker);
  for (auto& th : pool) th.join();
  const double total = std::chrono::duration<double>(std::chrono::steady_clock::now() - t0).count();

  const std::vector<column> cols = {
      {"held-out loss", "task_loss", 3, [](const toy_moe::run_result& r) { return r.eval.task_loss; }},
      {"MaxVio", "maxvio", 3, [](const toy_moe::run_result& r) { return r.eval.maxvio; }},
      {"entropy", "routing_entropy", 3, [](const toy_moe::run_result& r) { return r.eval.entropy; }},
      {"overlap h |cos|", "overlap_h_abs_cos", 3, [](const toy_moe::run_result& r) { return r.eval.overlap_h; }},
      {"overlap o |cos|", "overlap_o_abs_cos", 3, [](const toy_moe::run_result& r) { return r.eval.overlap_o; }},
      {"pathway conc.", "pathway_concentration", 3, [](const toy_moe::run_result& r) { return r.eval.pathway; }},
      {"topic MI", "topic_expert_mi", 3, [](const toy_moe::run_result& r) { return r.eval.topic_mi; }},
      {"time s", "wall_time_s", 2, [](const toy_moe::run_result& r) { return r.seconds; }},
  };
  // Further per-run quantities that go into the CSV only.
  const std::vector<column> extra = {
      {"", "accuracy", 4, [](const toy_moe::run_result& r) { return r.eval.accuracy; }},
      {"", "cv_counts", 4, [](const toy_moe::run_result& r) { return r.eval.cv; }},
      {"", "topk_mass", 4, [](const toy_moe::run_result& r) { return r.eval.topk_mass; }},
      {"", "overlap_h_cos2", 4, [](const toy_moe::run_result& r) { return r.eval.cos2_h; }},
      {"", "overlap_o_cos2", 4, [](const toy_moe::run_result& r) { return r.eval.cos2_o; }},
      {"", "pathway_mi", 4, [](const toy_moe::run_result& r) { return r.eval.pathway_mi; }},
      // The objective's terms at the last training step (coefficients included), to compare
      // the size of each regulariser with the task loss.
      {"", "last_task_term", 6, [](const toy_moe::run_result& r) { return r.last.task; }},
      {"", "last_lb_term", 6, [](const toy_moe::run_result& r) { return r.last.load_balancing; }},
      {"", "last_sp_term", 6, [](const toy_moe::run_result& r) { return r.last.specialization; }},
      {"", "last_cp_term", 6, [](const toy_moe::run_result& r) { return r.last.coupling; }},
      {"", "last_orth_term", 6, [](const toy_moe::run_result& r) { return r.last.orthogonality; }},
      {"", "last_var_term", 6, [](const toy_moe::run_result& r) { return r.last.variance; }},
  };

  auto values = [&](long c, const column& col) {
    std::vector<double> v;
    for (long s = 0; s < S; ++s) v.push_back(col.get(results[static_cast<std::size_t>(s * C + c)]));
    return v;
  };

  std::printf("\nheld-out set: %ld samples; Bayes-optimal loss %.3f nats, uniform guess %.3f nats\n",
              static_cast<long>(heldout.size), bayes, std::log(static_cast<double>(mc.vocab)));
  std::printf("mean +- sample standard deviation over %ld seeds; metrics averaged over layers "
              "(pathway over adjacent layer pairs)\n\n",
              S);
  std::printf("%-16s", "configuration");
  for (const auto& col : cols) std::printf(" | %-16s", col.header);
  std::printf("\n");
  std::printf("%s\n", std::string(16 + cols.size() * 19, '-').c_str());
  for (long c = 0; c < C; ++c) {
    std::printf("%-16s", configs[static_cast<std::size_t>(c)].name.c_str());
    for (const auto& col : cols) std::printf(" | %-16s", fmt(summarise(values(c, col)), col.decimals).c_str());
    std::printf("\n");
  }
  std::printf("\ntotal wall time %.1f s (%ld runs, %ld at a time)\n", total, S * C, opt.jobs);

  // CSV: the table (mean and sd per column), and every run.
  const std::string res_path = opt.out_dir + "/toy_moe_results.csv", runs_path = opt.out_dir + "/toy_moe_runs.csv";
  {
    std::ofstream f(res_path);
    f << "configuration,seeds";
    for (const auto& col : cols) f << "," << col.csv << "_mean," << col.csv << "_sd";
    for (const auto& col : extra) f << "," << col.csv << "_mean," << col.csv << "_sd";
    f << "\n";
    for (long c = 0; c < C; ++c) {
      f << '"' << configs[static_cast<std::size_t>(c)].name << "\"," << S;
      for (const auto* set : {&cols, &extra})
        for (const auto& col : *set) {
          const stat st = summarise(values(c, col));
          f << "," << st.mean << "," << st.sd;
        }
      f << "\n";
    }
    if (!f) std::fprintf(stderr, "toy_moe: could not write %s\n", res_path.c_str());
  }
  {
    std::ofstream f(runs_path);
    f << "configuration,seed";
    for (const auto* set : {&cols, &extra})
      for (const auto& col : *set) f << "," << col.csv;
    f << "\n";
    for (long c = 0; c < C; ++c)
      for (long s = 0; s < S; ++s) {
        const auto& r = results[static_cast<std::size_t>(s * C + c)];
        f << '"' << configs[static_cast<std::size_t>(c)].name << "\"," << 1000 + s;
        for (const auto* set : {&cols, &extra})
          for (const auto& col : *set) f << "," << col.get(r);
        f << "\n";
      }
  }
  std::printf("wrote %s and %s\n", res_path.c_str(), runs_path.c_str());

  if (opt.plot) {
    const std::string dat = opt.out_dir + "/toy_moe_curves.dat", png = opt.out_dir + "/toy_moe_curves.png",
                      gp = opt.out_dir + "/toy_moe_curves.gp";
    {
      std::ofstream f(dat);
      f << "# step";
      for (const auto& nc : configs) f << " \"" << nc.name << " held-out\"";
      for (const auto& nc : configs) f << " \"" << nc.name << " train\"";
      f << "\n";
      const auto& ref = results[0].curve;
      for (std::size_t i = 0; i < ref.size(); ++i) {
        f << ref[i].step;
        for (int which = 0; which < 2; ++which)
          for (long c = 0; c < C; ++c) {
            double m = 0;
            for (long s = 0; s < S; ++s) {
              const auto& pt = results[static_cast<std::size_t>(s * C + c)].curve[i];
              m += which == 0 ? pt.heldout_loss : pt.train_loss;
            }
            f << " " << m / static_cast<double>(S);
          }
        f << "\n";
      }
    }
    {
      std::ofstream f(gp);
      f << "set terminal png noenhanced size 1000,600\nset output '" << png << "'\n"
        << "set title 'toy_moe: task loss (mean over " << S << " seeds)'\nset xlabel 'step'\nset ylabel 'nats'\n"
        << "set key top right\nset grid\nset yrange [" << bayes - 0.2 << ":*]\n"
        << "plot ";
      for (long c = 0; c < C; ++c)
        f << (c ? ", " : "") << "'" << dat << "' using 1:" << 2 + c << " with lines lw 2 title '"
          << configs[static_cast<std::size_t>(c)].name << " held-out'";
      for (long c = 0; c < C; ++c)
        f << ", '" << dat << "' using 1:" << 2 + C + c << " with lines dt 2 title '"
          << configs[static_cast<std::size_t>(c)].name << " train'";
      f << ", " << bayes << " with lines lc rgb 'black' dt 3 title 'Bayes-optimal'\n";
    }
    if (std::system("command -v gnuplot > /dev/null 2>&1") != 0) {
      std::printf("--plot: gnuplot is not installed; wrote the curves to %s and the script to %s, no PNG drawn\n",
                  dat.c_str(), gp.c_str());
    } else if (std::system(("gnuplot '" + gp + "'").c_str()) != 0) {
      std::printf("--plot: gnuplot failed on %s; the curves are in %s\n", gp.c_str(), dat.c_str());
    } else {
      std::printf("wrote %s\n", png.c_str());
    }
  }

  // Sanity for the --quick test: every run finished with a finite loss better than guessing.
  bool ok = true;
  for (const auto& r : results)
    ok = ok && std::isfinite(r.eval.task_loss) && r.eval.task_loss < std::log(static_cast<double>(mc.vocab));
  if (!ok) std::fprintf(stderr, "toy_moe: a run did not learn (non-finite or no better than uniform)\n");
  return ok ? 0 : 1;
}
