// Pieces shared by the emulator harnesses (chunk_fwd_emu.cpp, chunk_bwd_emu.cpp): key=value
// arguments, cu_seqlens lists, and buffers with poisoned guard zones.
#pragma once

#include <cstdint>
#include <cstdio>
#include <cstdlib>
#include <cstring>
#include <fstream>
#include <map>
#include <string>
#include <vector>

namespace harness {

// key=value arguments over `defaults`; an unknown key or a malformed argument exits with 2.
inline std::map<std::string, std::string> parse_args(int argc, char** argv,
                                                     std::map<std::string, std::string> kv) {
  for (int i = 1; i < argc; ++i) {
    const std::string a = argv[i];
    const auto eq = a.find('=');
    if (eq == std::string::npos || !kv.count(a.substr(0, eq))) {
      std::fprintf(stderr, "bad argument %s\n", argv[i]);
      std::exit(2);
    }
    kv[a.substr(0, eq)] = a.substr(eq + 1);
  }
  return kv;
}

// "-" -> no offsets; "0,5,5,77" -> {0, 5, 5, 77}.
inline std::vector<int64_t> parse_offsets(const std::string& s) {
  std::vector<int64_t> cu;
  if (s == "-") return cu;
  size_t pos = 0;
  for (;;) {
    const size_t comma = s.find(',', pos);
    cu.push_back(std::stoll(s.substr(pos, comma == std::string::npos ? std::string::npos
                                                                    : comma - pos)));
    if (comma == std::string::npos) break;
    pos = comma + 1;
  }
  return cu;
}

// A buffer with poisoned guard zones on both sides; data() may be offset by `shift` elements
// (to misalign it).
template <typename X>
struct Guarded {
  static constexpr size_t kGuard = 64;
  std::vector<X> mem;
  size_t n, shift;
  X poison;
  Guarded(size_t n_, size_t shift_, X poison_) : n(n_), shift(shift_), poison(poison_) {
    mem.assign(n + 2 * kGuard + shift, poison);
  }
  X* data() { return mem.data() + kGuard + shift; }
  X& operator[](size_t i) { return data()[i]; }
  bool guards_intact() const {
    for (size_t i = 0; i < mem.size(); ++i) {
      const bool inside = i >= kGuard + shift && i < kGuard + shift + n;
      if (!inside && std::memcmp(&mem[i], &poison, sizeof(X)) != 0) return false;
    }
    return true;
  }
  void read(std::ifstream& f) {
    f.read(reinterpret_cast<char*>(data()), static_cast<std::streamsize>(n * sizeof(X)));
  }
  void write(std::ofstream& f) {
    f.write(reinterpret_cast<const char*>(data()), static_cast<std::streamsize>(n * sizeof(X)));
  }
  std::vector<X> copy() { return std::vector<X>(data(), data() + n); }
  void fill_poison() { std::fill(data(), data() + n, poison); }
};

// Reads the buffers, in order, from the file at path (an empty buffer reads nothing); exits
// with 2 when the file cannot be read or is too short.
template <typename... Bufs>
void read_inputs(const std::string& path, Bufs&... bufs) {
  std::ifstream f(path, std::ios::binary);
  if (!f) {
    std::fprintf(stderr, "cannot read %s\n", path.c_str());
    std::exit(2);
  }
  (bufs.read(f), ...);
  if (!f) {
    std::fprintf(stderr, "input file too short\n");
    std::exit(2);
  }
}

}  // namespace harness
