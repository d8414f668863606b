// The demo's data: Debian's fortune-cookie files in seven languages (packages fortunes,
// fortunes-de, -es, -it, -cs, -pl, -ru), read as bytes (examples/text_moe, docs/demo.md).
//
// What is read. In each language folder (the English files lie in the top folder itself) the
// regular files only: not the .dat indexes, not the .u8 names (symbolic links or empty files),
// not the symbolic links the packages add for compatibility (the top folder's links into it/,
// the cz/ and sk/ folders) and not the offensive sections (the off/ folders are never
// entered; the loader does not descend into any subfolder). One Czech-package file,
// klasik-sk, is Slovak and is left out so that every byte's language label is right.
//
// A file is a list of fortunes separated by lines holding a single '%'. Each fortune is kept
// with its bytes as they are (UTF-8 text). Identical fortunes inside a language are kept
// once. A fortune goes to the held-out set when its 64-bit FNV-1a hash is 0 modulo
// `heldout_mod`, else to the training set: whole fortunes, and a text that occurs twice lands
// on the same side both times. Then the languages are balanced by bytes: in the order of
// their hashes, each language keeps fortunes while it stays within the byte count of the
// smallest language (separately for the two sets).
//
// A corpus is one byte buffer: `window` zero bytes, a fortune, `window` zero bytes, the next
// fortune, ... (byte 0 does not occur in the text). The context of the byte at position i is
// then simply the `window` bytes before it, zeros at the start of a fortune; lang[i] is the
// language of the byte (no_language for the padding, which is never a target).
#pragma once

#include <algorithm>
#include <cstdint>
#include <filesystem>
#include <fstream>
#include <iterator>
#include <random>
#include <stdexcept>
#include <string>
#include <unordered_set>
#include <vector>

namespace text_moe {

struct language {
  const char* code;     ///< ISO 639-1
  const char* folder;   ///< under the fortunes folder; "" = the top folder
  const char* package;  ///< the Debian package that installs it
};

inline const std::vector<language>& languages() {
  static const std::vector<language> all = {
      {"en", "", "fortunes"},      {"de", "de", "fortunes-de"}, {"es", "es", "fortunes-es"},
      {"it", "it", "fortunes-it"}, {"cs", "cs", "fortunes-cs"}, {"pl", "pl", "fortunes-pl"},
      {"ru", "ru", "fortunes-ru"},
  };
  return all;
}

constexpr std::uint8_t no_language = 255;

/// 64-bit FNV-1a.
inline std::uint64_t fnv1a(const std::string& s) {
  std::uint64_t h = 1469598103934665603ULL;
  for (unsigned char c : s) {
    h ^= c;
    h *= 1099511628211ULL;
  }
  return h;
}

/// Splits the text of one fortune file at its '%' lines; empty fortunes are dropped.
inline std::vector<std::string> split_fortunes(const std::string& text) {
  std::vector<std::string> out;
  std::string cur;
  std::size_t i = 0;
  while (i < text.size()) {
    std::size_t j = text.find('\n', i);
    const bool last = j == std::string::npos;
    if (last) j = text.size();
    std::string line = text.substr(i, j - i);
    if (!line.empty() && line.back() == '\r') line.pop_back();
    if (line == "%") {
      if (cur.find_first_not_of(" \t\r\n") != std::string::npos) out.push_back(cur);
      cur.clear();
    } else {
      cur.append(text, i, j - i);
      if (!last) cur.push_back('\n');
    }
    i = last ? text.size() : j + 1;
  }
  if (cur.find_first_not_of(" \t\r\n") != std::string::npos) out.push_back(cur);
  return out;
}

/// The fortune files of one language, sorted by name (directory order is not fixed).
inline std::vector<std::filesystem::path> fortune_files(const std::filesystem::path& root, const language& lg) {
  namespace fs = std::filesystem;
  const fs::path dir = std::string(lg.folder).empty() ? root : root / lg.folder;
  std::vector<fs::path> files;
  std::error_code ec;
  if (!fs::is_directory(dir, ec)) return files;
  for (const auto& ent : fs::directory_iterator(dir, ec)) {
    const auto st = ent.symlink_status(ec);
    if (!fs::is_regular_file(st)) continue;  // links, folders (off/ among them)
    const std::string name = ent.path().filename().string();
    const auto ends = [&](const std::string& suf) {
      return name.size() >= suf.size() && name.compare(name.size() - suf.size(), suf.size(), suf) == 0;
    };
    if (ends(".dat") || ends(".u8")) continue;
    if (name == "klasik-sk") continue;  // Slovak, in the Czech package
    if (ent.file_size(ec) == 0) continue;
    files.push_back(ent.path());
  }
  std::sort(files.begin(), files.end());
  return files;
}

/// One set (training or held-out) as a padded byte buffer.
struct corpus {
  std::int64_t window = 0;
  std::vector<std::uint8_t> bytes;                   ///< padding, fortune, padding, fortune, ...
  std::vector<std::uint8_t> lang;                    ///< language index of each byte, no_language for padding
  std::vector<std::int64_t> text_bytes;              ///< per language
  std::vector<std::int64_t> fortunes;                ///< per language
  std::vector<std::vector<std::int64_t>> positions;  ///< per language: the target positions
};

struct dataset {
  corpus train, heldout;
  std::vector<std::int64_t> files, raw_bytes, raw_fortunes;  ///< per language, before the split and balancing
};

/// Loads the seven languages under `root` (normally /usr/share/games/fortunes). Throws
/// std::runtime_error naming the missing package when a language has no files.
inline dataset load_fortunes(const std::string& root, std::int64_t window, std::uint64_t heldout_mod = 10) {
  const auto& langs = languages();
  const std::size_t L = langs.size();
  struct item {
    std::uint64_t hash;
    std::string text;
  };
  std::vector<std::vector<item>> train(L), held(L);
  dataset ds;
  ds.files.assign(L, 0);
  ds.raw_bytes.assign(L, 0);
  ds.raw_fortunes.assign(L, 0);
  for (std::size_t l = 0; l < L; ++l) {
    const auto files = fortune_files(root, langs[l]);
    if (files.empty())
      throw std::runtime_error(std::string("no fortune files for language '") + langs[l].code + "' under " + root +
                               " (install the Debian package " + langs[l].package + ")");
    std::unordered_set<std::uint64_t> seen;
    for (const auto& f : files) {
      std::ifstream in(f, std::ios::binary);
      const std::string text((std::istreambuf_iterator<char>(in)), std::istreambuf_iterator<char>());
      ++ds.files[l];
      for (auto& fo : split_fortunes(text)) {
        const std::uint64_t h = fnv1a(fo);
        if (!seen.insert(h).second) continue;
        ++ds.raw_fortunes[l];
        ds.raw_bytes[l] += static_cast<std::int64_t>(fo.size());
        (h % heldout_mod == 0 ? held : train)[l].push_back({h, std::move(fo)});
      }
    }
  }
  auto build = [&](std::vector<std::vector<item>>& sets, corpus& c) {
    c.window = window;
    std::int64_t cap = -1;
    for (auto& s : sets) {
      std::sort(s.begin(), s.end(),
                [](const item& a, const item& b) { return a.hash < b.hash || (a.hash == b.hash && a.text < b.text); });
      std::int64_t n = 0;
      for (const auto& it : s) n += static_cast<std::int64_t>(it.text.size());
      cap = cap < 0 ? n : std::min(cap, n);
    }
    c.text_bytes.assign(L, 0);
    c.fortunes.assign(L, 0);
    c.positions.assign(L, {});
    const auto pad = [&]() {
      c.bytes.insert(c.bytes.end(), static_cast<std::size_t>(window), std::uint8_t(0));
      c.lang.insert(c.lang.end(), static_cast<std::size_t>(window), no_language);
    };
    for (std::size_t l = 0; l < L; ++l)
      for (const auto& it : sets[l]) {
        const auto n = static_cast<std::int64_t>(it.text.size());
        if (c.text_bytes[l] + n > cap) continue;  // smaller fortunes later in the order may still fit
        pad();
        for (char ch : it.text) {
          c.positions[l].push_back(static_cast<std::int64_t>(c.bytes.size()));
          c.bytes.push_back(static_cast<std::uint8_t>(ch));
          c.lang.push_back(static_cast<std::uint8_t>(l));
        }
        c.text_bytes[l] += n;
        ++c.fortunes[l];
      }
    pad();
  };
  build(train, ds.train);
  build(held, ds.heldout);
  return ds;
}

/// A batch of next-byte samples: contexts [size, window] (row-major, oldest byte first), the
/// next byte and its language [size].
struct batch {
  std::int64_t size = 0, window = 0;
  std::vector<std::uint8_t> context;
  std::vector<std::int32_t> target, lang;
};

inline void add_sample(const corpus& c, std::int64_t pos, batch& b) {
  for (std::int64_t j = pos - c.window; j < pos; ++j) b.context.push_back(c.bytes[static_cast<std::size_t>(j)]);
  b.target.push_back(c.bytes[static_cast<std::size_t>(pos)]);
  b.lang.push_back(c.lang[static_cast<std::size_t>(pos)]);
  ++b.size;
}

/// n target positions drawn uniformly over all text bytes of the corpus (languages are
/// balanced by bytes, so each is drawn equally often on average).
inline batch sample_uniform(const corpus& c, std::mt19937_64& g, std::int64_t n) {
  batch b;
  b.window = c.window;
  b.context.reserve(static_cast<std::size_t>(n * c.window));
  std::uniform_int_distribution<std::int64_t> u(c.window, static_cast<std::int64_t>(c.bytes.size()) - 1);
  while (b.size < n) {
    const std::int64_t pos = u(g);
    if (c.lang[static_cast<std::size_t>(pos)] != no_language) add_sample(c, pos, b);
  }
  return b;
}

/// per_language positions of each language (stratified), in language order.
inline batch sample_stratified(const corpus& c, std::mt19937_64& g, std::int64_t per_language) {
  batch b;
  b.window = c.window;
  for (const auto& pos : c.positions) {
    if (pos.empty()) continue;
    std::uniform_int_distribution<std::size_t> u(0, pos.size() - 1);
    for (std::int64_t i = 0; i < per_language; ++i) add_sample(c, pos[u(g)], b);
  }
  return b;
}

}  // namespace text_moe
