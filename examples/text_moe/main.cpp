// text_moe: trains the same byte-level MoE language model (text_moe.hpp) on fortune cookies in
// seven languages (fortunes.hpp) from the same seeds under each regulariser of the papers, at
// the papers' strength and at 10 and 100 times it, and prints what they do to the model.
//
//   baseline        load balancing only (alpha = 1e-2), in every configuration
//   +spec           + specialization on h (Hu et al., lambda = 2e-3)
//   +coup           + coupling, token form (Hu et al., lambda = 1e-3)
//   +Hu             + both
//   +orth           + orthogonality on o, pairwise (Guo et al., beta = 1e-4)
//   +var            + variance, tokens axis (Guo et al., gamma = 1e-3)
//   +Guo            + both
//   all             every loss above
//   +Hu x10, x100, +Guo x10, x100: the two papers' pairs with both coefficients scaled
//
// Usage: text_moe [--quick] [--seeds N] [--steps N] [--jobs N] [--data DIR] [--out-dir DIR]
#include <atomic>
#include <chrono>
#include <cmath>
#include <cstdio>
#include <cstdlib>
#include <filesystem>
#include <fstream>
#include <functional>
#include <iostream>
#include <mutex>
#include <sstream>
#include <string>
#include <thread>
#include <vector>

#include <Eigen/Core>

#include "text_moe.hpp"

namespace {

struct named_config {
  std::string name;
  text_moe::reg_config reg;
};

struct options {
  bool quick = false;
  long seeds = -1, steps = -1, jobs = 2;
  std::string data = "/usr/share/games/fortunes", out_dir = ".";
};

void usage() {
  std::printf(
      "usage: text_moe [--quick] [--seeds N] [--steps N] [--jobs N] [--data DIR] [--out-dir DIR]\n"
      "  --quick     a small model, short runs and 2 seeds (the CTest test)\n"
      "  --seeds N   seeds per configuration (default 3; 2 with --quick)\n"
      "  --steps N   training steps per run (default 1200; 150 with --quick)\n"
      "  --jobs N    runs trained at the same time, one thread each (default 2)\n"
      "  --data DIR  the fortunes folder (default /usr/share/games/fortunes)\n"
      "  --out-dir   where text_moe_*.csv, text_moe_table.txt and text_moe.png go (default .)\n");
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
    if (a == "--quick")
      o.quick = true;
    else if (a == "--seeds") {
      if (!num(o.seeds)) return false;
    } else if (a == "--steps") {
      if (!num(o.steps)) return false;
    } else if (a == "--jobs") {
      if (!num(o.jobs)) return false;
    } else if (a == "--data" && i + 1 < argc)
      o.data = argv[++i];
    else if (a == "--out-dir" && i + 1 < argc)
      o.out_dir = argv[++i];
    else
      return false;
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
  std::string header, csv;
  int decimals;
  std::function<double(const text_moe::run_result&)> get;
};

std::string fmt(const stat& s, int decimals) {
  char buf[64];
  std::snprintf(buf, sizeof buf, "%.*f+-%.*f", decimals, s.mean, decimals, s.sd);
  return buf;
}

std::string fixed(double v, int decimals) {
  char buf[64];
  std::snprintf(buf, sizeof buf, "%.*f", decimals, v);
  return buf;
}

// The CSV files carry every digit of a double (%.17g), so equal runs give equal files.
std::string full(double v) {
  char buf[64];
  std::snprintf(buf, sizeof buf, "%.17g", v);
  return buf;
}

}  // namespace

int main(int argc, char** argv) {
  options opt;
  if (!parse(argc, argv, opt)) {
    usage();
    return 2;
  }
  if (opt.seeds < 0) opt.seeds = opt.quick ? 2 : 3;
  if (opt.steps < 0) opt.steps = opt.quick ? 150 : 1200;
  Eigen::setNbThreads(1);  // one thread per run; runs go in parallel instead

  text_moe::model_config mc;  // the defaults of text_moe.hpp
  text_moe::train_config trc;
  text_moe::index_t heldout_per_lang = 2048, probe_size = 8192, curve_per_lang = 256;
  if (opt.quick) {
    mc.dim = 32;
    mc.hidden = 16;
    trc.batch = 64;
    trc.warmup = 10;
    heldout_per_lang = 512;
    probe_size = 2048;
    curve_per_lang = 64;
  }
  trc.steps = opt.steps;
  trc.eval_every = std::max<long>(opt.steps / 20, 1);
  const text_moe::index_t prefetch_k = mc.top_k;

  const auto& langs = text_moe::languages();
  const auto nlang = static_cast<text_moe::index_t>(langs.size());
  text_moe::dataset ds;
  try {
    ds = text_moe::load_fortunes(opt.data, mc.window);
  } catch (const std::exception& e) {
    std::fprintf(stderr, "text_moe: %s\n", e.what());
    return 1;
  }
  std::mt19937_64 hg(0xC0FFEE);
  const text_moe::batch heldout = text_moe::sample_stratified(ds.heldout, hg, heldout_per_lang);
  const text_moe::batch curve_batch = text_moe::sample_stratified(ds.heldout, hg, curve_per_lang);
  const text_moe::batch train_probe = text_moe::sample_uniform(ds.train, hg, probe_size);

  // The report goes to stdout and, without the timing lines, to text_moe_table.txt.
  std::ostringstream rep;
  auto both = [&](const std::string& s) {
    rep << s;
    std::fputs(s.c_str(), stdout);
  };
  {
    std::ostringstream os;
    os << "text_moe: fortunes in " << nlang << " languages (" << opt.data << ")\n";
    os << "  language   files   fortunes      bytes  | train bytes (fortunes) | held-out bytes (fortunes)\n";
    for (std::size_t l = 0; l < langs.size(); ++l) {
      char buf[200];
      std::snprintf(buf, sizeof buf, "  %-8s %7lld %10lld %10lld  | %11lld (%6lld)     | %9lld (%5lld)\n",
                    langs[l].code, static_cast<long long>(ds.files[l]), static_cast<long long>(ds.raw_fortunes[l]),
                    static_cast<long long>(ds.raw_bytes[l]), static_cast<long long>(ds.train.text_bytes[l]),
                    static_cast<long long>(ds.train.fortunes[l]), static_cast<long long>(ds.heldout.text_bytes[l]),
                    static_cast<long long>(ds.heldout.fortunes[l]));
      os << buf;
    }
    os << "model: previous " << mc.window << " bytes, embeddings " << mc.embed << " wide, mixed to D = " << mc.dim
       << "; " << mc.layers << " MoE layers x " << mc.experts << " SwiGLU experts (d_ff " << mc.hidden << "), top-"
       << mc.top_k << ", softmax router, residual; softmax over 256 bytes (" << text_moe::param_layout(mc).total
       << " parameters with padding)\n";
    os << "training: " << trc.steps << " steps of " << trc.batch << " bytes, Adam lr " << trc.lr << ", float32; "
       << opt.seeds << " seeds per configuration\n";
    os << "held-out: " << heldout_per_lang << " bytes per language (" << heldout.size
       << "), successor tables for the prefetch rate from " << probe_size << " training bytes\n";
    both(os.str());
  }

  const double lb = 1e-2, sp = 2e-3, cp = 1e-3, orth = 1e-4, var = 1e-3;  // LOSSES.md defaults (the papers')
  std::vector<named_config> configs = {
      {"baseline", {lb, 0, 0, 0, 0, 0}},
      {"+spec", {lb, sp, 0, 0, 0, 0}},
      {"+coup", {lb, 0, cp, 0, 0, 0}},
      {"+Hu", {lb, sp, cp, 0, 0, 0}},
      {"+orth", {lb, 0, 0, orth, 0, 0}},
      {"+var", {lb, 0, 0, 0, var, 0}},
      {"+Guo", {lb, 0, 0, orth, var, 0}},
      {"all", {lb, sp, cp, orth, var, 0}},
      {"+Hu x10", {lb, 10 * sp, 10 * cp, 0, 0, 0}},
      {"+Hu x100", {lb, 100 * sp, 100 * cp, 0, 0, 0}},
      {"+Guo x10", {lb, 0, 0, 10 * orth, 10 * var, 0}},
      {"+Guo x100", {lb, 0, 0, 100 * orth, 100 * var, 0}},
  };
  const long S = opt.seeds, C = static_cast<long>(configs.size());
  std::printf("training %ld runs (%ld configurations x %ld seeds), %ld at a time\n", S * C, C, S, opt.jobs);
  std::fflush(stdout);

  // Runs are independent and single-threaded; a run's numbers do not depend on which thread
  // trains it or when, so any --jobs gives the same table.
  std::vector<text_moe::run_result> results(static_cast<std::size_t>(S * C));
  std::atomic<long> next{0};
  std::atomic<long> done{0};
  std::mutex print_mu;
  const auto t0 = std::chrono::steady_clock::now();
  auto worker = [&]() {
    for (long j; (j = next.fetch_add(1)) < S * C;) {
      const long c = j % C, s = j / C;
      text_moe::train_config tj = trc;
      tj.seed = static_cast<std::uint64_t>(1000 + s);
      auto& r = results[static_cast<std::size_t>(j)];
      r = text_moe::train<float>(ds.train, mc, configs[static_cast<std::size_t>(c)].reg, tj, heldout, train_probe,
                                 nlang, prefetch_k, &curve_batch);
      const long d = ++done;
      const double el = std::chrono::duration<double>(std::chrono::steady_clock::now() - t0).count();
      std::lock_guard<std::mutex> lk(print_mu);
      std::fprintf(stderr, "  [%2ld/%ld %6.1f s] %-10s seed %ld: held-out %.3f bits/byte (%.1f s)\n", d, S * C, el,
                   configs[static_cast<std::size_t>(c)].name.c_str(), 1000 + s, r.eval.bits_per_byte, r.seconds);
    }
  };
  std::vector<std::thread> pool;
  for (long i = 0; i < opt.jobs; ++i) pool.emplace_back(worker);
  for (auto& th : pool) th.join();
  const double total = std::chrono::duration<double>(std::chrono::steady_clock::now() - t0).count();

  using rr = text_moe::run_result;
  const auto NLy = mc.layers;
  std::vector<column> routing = {
      {"bits/byte", "bits_per_byte", 3, [](const rr& r) { return r.eval.bits_per_byte; }},
      {"MaxVio", "maxvio", 3, [](const rr& r) { return r.eval.maxvio; }},
      {"entropy", "routing_entropy", 3, [](const rr& r) { return r.eval.entropy; }},
      {"pathway conc.", "pathway_concentration", 3, [](const rr& r) { return r.eval.pathway; }},
      {"prefetch hit", "prefetch_hit", 3, [](const rr& r) { return r.eval.prefetch; }},
      {"prefetch chance", "prefetch_chance", 3, [](const rr& r) { return r.eval.prefetch_chance; }},
  };
  std::vector<column> special = {
      {"h |cos|", "overlap_h_abs_cos", 3, [](const rr& r) { return r.eval.overlap_h; }},
      {"h cos^2", "overlap_h_cos2", 4, [](const rr& r) { return r.eval.cos2_h; }},
      {"o |cos|", "overlap_o_abs_cos", 3, [](const rr& r) { return r.eval.overlap_o; }},
      {"o cos^2", "overlap_o_cos2", 4, [](const rr& r) { return r.eval.cos2_o; }},
  };
  for (text_moe::index_t l = 0; l < NLy; ++l)
    special.push_back({"lang MI L" + std::to_string(l + 1), "lang_mi_l" + std::to_string(l + 1), 3,
                       [l](const rr& r) { return r.eval.lang_mi[static_cast<std::size_t>(l)]; }});
  special.push_back({"majority share", "majority_share", 3, [](const rr& r) { return r.eval.majority_mean; }});
  std::vector<column> per_lang;
  for (std::size_t l = 0; l < langs.size(); ++l)
    per_lang.push_back({langs[l].code, std::string("bpb_") + langs[l].code, 3,
                        [l](const rr& r) { return r.eval.bits_per_byte_lang[l]; }});
  // CSV only.
  std::vector<column> extra = {
      {"", "accuracy", 4, [](const rr& r) { return r.eval.accuracy; }},
      {"", "cv_counts", 4, [](const rr& r) { return r.eval.cv; }},
      {"", "topk_mass", 4, [](const rr& r) { return r.eval.topk_mass; }},
      {"", "lang_mi_mean", 4, [](const rr& r) { return r.eval.lang_mi_mean; }},
      {"", "pathway_mi", 4, [](const rr& r) { return r.eval.pathway_mi; }},
      {"", "last_task_term", 6, [](const rr& r) { return r.last.task; }},
      {"", "last_lb_term", 6, [](const rr& r) { return r.last.load_balancing; }},
      {"", "last_sp_term", 6, [](const rr& r) { return r.last.specialization; }},
      {"", "last_cp_term", 6, [](const rr& r) { return r.last.coupling; }},
      {"", "last_orth_term", 6, [](const rr& r) { return r.last.orthogonality; }},
      {"", "last_var_term", 6, [](const rr& r) { return r.last.variance; }},
  };
  for (text_moe::index_t l = 0; l < NLy; ++l) {
    const auto li = static_cast<std::size_t>(l);
    extra.push_back(
        {"", "majority_share_l" + std::to_string(l + 1), 4, [li](const rr& r) { return r.eval.majority_share[li]; }});
    // Per expert: the share of its tokens in its majority language, and that language (the
    // index of the language in the order en de es it cs pl ru; -1 = the expert got no token).
    for (text_moe::index_t e = 0; e < mc.experts; ++e) {
      const auto ei = static_cast<std::size_t>(e);
      const std::string tag = "_l" + std::to_string(l + 1) + "_e" + std::to_string(e);
      extra.push_back({"", "majority_share" + tag, 4, [li, ei](const rr& r) { return r.eval.expert_share[li][ei]; }});
      extra.push_back({"", "majority_language" + tag, 0,
                       [li, ei](const rr& r) { return static_cast<double>(r.eval.expert_language[li][ei]); }});
    }
  }
  for (text_moe::index_t q = 0; q + 1 < NLy; ++q) {
    const std::string tag = std::to_string(q + 1) + std::to_string(q + 2);
    const auto qi = static_cast<std::size_t>(q);
    extra.push_back({"", "pathway_l" + tag, 4, [qi](const rr& r) { return r.eval.pathway_pair[qi]; }});
    extra.push_back({"", "prefetch_hit_l" + tag, 4, [qi](const rr& r) { return r.eval.prefetch_pair[qi]; }});
    extra.push_back({"", "prefetch_chance_l" + tag, 4, [qi](const rr& r) { return r.eval.prefetch_chance_pair[qi]; }});
  }
  const std::vector<column> timing = {
      {"ms/step", "ms_per_step_median", 3, [](const rr& r) { return 1e3 * r.median_step; }},
      {"losses ms/step", "loss_ms_per_step_median", 3, [](const rr& r) { return 1e3 * r.median_reg; }},
      {"run s", "train_seconds", 1, [](const rr& r) { return r.seconds; }},
  };

  auto values = [&](long c, const column& col) {
    std::vector<double> v;
    for (long s = 0; s < S; ++s) v.push_back(col.get(results[static_cast<std::size_t>(s * C + c)]));
    return v;
  };
  auto table = [&](const std::string& title, const std::vector<column>& cols, int width) {
    std::ostringstream os;
    os << "\n" << title << "\n";
    char buf[64];
    std::snprintf(buf, sizeof buf, "%-10s", "config");
    os << buf;
    for (const auto& col : cols) {
      std::snprintf(buf, sizeof buf, " | %-*s", width, col.header.c_str());
      os << buf;
    }
    os << "\n" << std::string(10 + cols.size() * static_cast<std::size_t>(width + 3), '-') << "\n";
    for (long c = 0; c < C; ++c) {
      std::snprintf(buf, sizeof buf, "%-10s", configs[static_cast<std::size_t>(c)].name.c_str());
      os << buf;
      for (const auto& col : cols) {
        std::snprintf(buf, sizeof buf, " | %-*s", width, fmt(summarise(values(c, col)), col.decimals).c_str());
        os << buf;
      }
      os << "\n";
    }
    // No trailing blanks (the tables are pasted into docs).
    std::string out = os.str(), clean;
    for (std::size_t i = 0; i < out.size(); ++i) {
      if (out[i] == ' ') {
        const std::size_t j = out.find_first_not_of(' ', i);
        if (j == std::string::npos || out[j] == '\n') {
          i = (j == std::string::npos ? out.size() : j) - 1;
          continue;
        }
      }
      clean.push_back(out[i]);
    }
    return clean;
  };

  both("\nmean+-sample standard deviation over " + std::to_string(S) +
       " seeds; routing metrics are means over layers (pathway and prefetch over adjacent layer pairs);\n"
       "uniform routing has entropy " +
       fixed(std::log(static_cast<double>(mc.experts)), 3) +
       " nats; language MI is at most log 7 = 1.946 nats; a majority share of 1/7 = 0.143 is no specialization\n");
  both(table("Held-out loss and routing", routing, 15));
  both(table("Expert overlap (co-selected experts) and expert-language specialization", special, 15));
  both(table("Held-out bits per byte by language", per_lang, 13));

  // Timing: the only numbers that change from run to run; not in text_moe_table.txt.
  {
    std::ostringstream os;
    os << table("Cost: median wall time of a training step and of the moereg loss calls in it; the run's training time",
                timing, 15);
    const stat base = summarise(values(0, timing[0]));
    os << "ms/step relative to the baseline:";
    for (long c = 1; c < C; ++c)
      os << (c > 1 ? "," : "") << " " << configs[static_cast<std::size_t>(c)].name << " "
         << fixed(summarise(values(c, timing[0])).mean / base.mean, 2);
    os << "\ntotal training wall time " << fixed(total, 1) << " s (" << S * C << " runs, " << opt.jobs
       << " at a time)\n";
    std::fputs(os.str().c_str(), stdout);
  }

  {
    std::error_code ec;
    std::filesystem::create_directories(opt.out_dir, ec);
  }
  const std::string base_path = opt.out_dir + "/text_moe";
  {
    std::ofstream f(base_path + "_table.txt");
    f << rep.str();
  }
  const std::vector<const std::vector<column>*> sets = {&routing, &special, &per_lang, &extra, &timing};
  {
    std::ofstream f(base_path + "_results.csv");
    f << "configuration,seeds";
    for (const auto* set : sets)
      for (const auto& col : *set) f << "," << col.csv << "_mean," << col.csv << "_sd";
    f << "\n";
    for (long c = 0; c < C; ++c) {
      f << '"' << configs[static_cast<std::size_t>(c)].name << "\"," << S;
      for (const auto* set : sets)
        for (const auto& col : *set) {
          const stat st = summarise(values(c, col));
          f << "," << full(st.mean) << "," << full(st.sd);
        }
      f << "\n";
    }
  }
  {
    std::ofstream f(base_path + "_runs.csv");
    f << "configuration,seed,load_balancing,specialization,coupling,orthogonality,variance";
    for (const auto* set : sets)
      for (const auto& col : *set) f << "," << col.csv;
    f << "\n";
    for (long c = 0; c < C; ++c)
      for (long s = 0; s < S; ++s) {
        const auto& r = results[static_cast<std::size_t>(s * C + c)];
        const auto& g = configs[static_cast<std::size_t>(c)].reg;
        f << '"' << configs[static_cast<std::size_t>(c)].name << "\"," << 1000 + s << "," << g.load_balancing << ","
          << g.specialization << "," << g.coupling << "," << g.orthogonality << "," << g.variance;
        for (const auto* set : sets)
          for (const auto& col : *set) f << "," << full(col.get(r));
        f << "\n";
      }
  }
  // Figure data: one row per configuration, and the mean curves over seeds.
  const std::string pts = base_path + "_points.dat", crv = base_path + "_curves.dat", gp = base_path + ".gp",
                    png = base_path + ".png";
  {
    std::ofstream f(pts);
    f << "# config bpb bpb_sd lang_mi lang_mi_sd overlap_h overlap_h_sd overlap_o overlap_o_sd\n";
    const column mi{"", "", 0, [](const rr& r) { return r.eval.lang_mi_mean; }};
    for (long c = 0; c < C; ++c) {
      f << '"' << configs[static_cast<std::size_t>(c)].name << '"';
      for (const column* col : std::vector<const column*>{&routing[0], &mi, &special[0], &special[2]}) {
        const stat st = summarise(values(c, *col));
        f << " " << full(st.mean) << " " << full(st.sd);
      }
      f << "\n";
    }
  }
  {
    std::ofstream f(crv);
    f << "# step, then per configuration the held-out and the training bits per byte (mean over seeds)\n";
    const auto& ref = results[0].curve;
    for (std::size_t i = 0; i < ref.size(); ++i) {
      f << ref[i].step;
      for (long c = 0; c < C; ++c) {
        double h = 0, t = 0;
        for (long s = 0; s < S; ++s) {
          const auto& pt = results[static_cast<std::size_t>(s * C + c)].curve[i];
          h += pt.heldout_bpb;
          t += pt.train_bpb;
        }
        f << " " << full(h / static_cast<double>(S)) << " " << full(t / static_cast<double>(S));
      }
      f << "\n";
    }
  }
  {
    std::ofstream f(gp);
    f << "set terminal png noenhanced size 1200,860\n"
      << "set output '" << png << "'\n"
      << "set multiplot layout 2,2 title 'text_moe: byte-level MoE on fortunes in 7 languages (" << S
      << " seeds; bars = seed standard deviation)'\n"
      << "set grid\nset key outside right top\n";
    // One colour per configuration: greens and blues for Hu et al.'s losses, oranges and reds
    // for Guo et al.'s, darker for stronger.
    const std::vector<std::string> colour = {"#000000", "#66c2a4", "#238b45", "#6baed6", "#fdae6b", "#c51b8a",
                                             "#f16913", "#756bb1", "#2171b5", "#08306b", "#d7301f", "#7f0000"};
    auto lc = [&](long c) { return " lc rgb '" + colour[static_cast<std::size_t>(c) % colour.size()] + "'"; };
    auto points = [&](const std::string& x, const std::string& xsd, int pt, bool titles) {
      std::ostringstream os;
      for (long c = 0; c < C; ++c)
        os << (c ? ", " : "") << "'" << pts << "' every ::" << c << "::" << c << " using " << x << ":2:" << xsd
           << ":3 with xyerrorbars pt " << pt << " ps 1.5 lw 1.5" << lc(c)
           << (titles ? " title '" + configs[static_cast<std::size_t>(c)].name + "'" : " notitle");
      return os.str();
    };
    f << "set title 'held-out bits/byte vs language-expert MI (mean over layers)'\n"
      << "set xlabel 'MI(language; selected expert), nats'\nset ylabel 'held-out bits per byte'\n"
      << "plot " << points("4", "5", 7, true) << "\n";
    f << "set title 'held-out bits/byte vs expert overlap: filled = outputs o, open = SwiGLU h'\n"
      << "set xlabel 'mean |cos| of co-selected experts'\nset ylabel 'held-out bits per byte'\n"
      << "plot " << points("8", "9", 7, true) << ", " << points("6", "7", 6, false) << "\n";
    auto curves = [&](bool relative) {
      std::ostringstream os;
      for (long c = relative ? 1 : 0; c < C; ++c)
        os << (c > (relative ? 1 : 0) ? ", " : "") << "'" << crv
           << "' using 1:" << (relative ? "($" + std::to_string(2 + 2 * c) + "-$2)" : std::to_string(2 + 2 * c))
           << " with lines lw 1.5" << lc(c) << " title '" << configs[static_cast<std::size_t>(c)].name << "'";
      return os.str();
    };
    f << "set title 'held-out bits per byte during training (mean over seeds)'\n"
      << "set xlabel 'step'\nset ylabel 'bits per byte'\nplot " << curves(false) << "\n";
    f << "set title 'the same, minus the baseline (below 0 = better than load balancing alone)'\n"
      << "set xlabel 'step'\nset ylabel 'bits per byte minus baseline'\nplot " << curves(true)
      << ", 0 with lines lc rgb '#000000' dt 2 notitle\n";
    f << "unset multiplot\n";
  }
  std::printf("wrote %s_table.txt, %s_results.csv, %s_runs.csv\n", base_path.c_str(), base_path.c_str(),
              base_path.c_str());
  bool ok = true;
  if (std::system("command -v gnuplot > /dev/null 2>&1") != 0) {
    std::fprintf(stderr, "text_moe: gnuplot is not installed (tools/install-deps.sh installs it); no PNG drawn\n");
    ok = false;
  } else if (std::system(("gnuplot '" + gp + "'").c_str()) != 0) {
    std::fprintf(stderr, "text_moe: gnuplot failed on %s\n", gp.c_str());
    ok = false;
  } else {
    std::printf("wrote %s\n", png.c_str());
  }

  // Sanity for the --quick test: every run finished with a finite loss better than guessing.
  for (const auto& r : results) ok = ok && std::isfinite(r.eval.bits_per_byte) && r.eval.bits_per_byte < 8.0;
  if (!ok) std::fprintf(stderr, "text_moe: a run did not learn (non-finite or no better than uniform) or no figure\n");
  return ok ? 0 : 1;
}
