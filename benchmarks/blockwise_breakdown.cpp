// Harness of benchmarks/blockwise_breakdown.py: runs the avx512vbmi block-quantized AdamW kernel
// (ops/csrc/cpu, included from the source tree given with -I, possibly an ablated copy) on one
// thread, outside torch, and times it; then times single zmm instructions of the ablation's
// suspects (shuffles, mul, sqrt, div) in cycles.
//
//   harness DIR STEPS REPEATS   DIR holds input.bin (written by the script); the state after
//                               STEPS steps goes to DIR/output.bin, then REPEATS more steps are
//                               timed. Prints one JSON line.
//   harness --throughput        prints one JSON line of cycles per instruction.
#include <algorithm>
#include <chrono>
#include <cstdint>
#include <cstdio>
#include <cstring>
#include <initializer_list>
#include <stdexcept>
#include <string>
#include <vector>

#include "cpu/plane_tables.h"
#include "cpu/simd_scalar.h"
#pragma GCC target("avx512f,avx512bw,avx512vbmi,avx2,fma,f16c")
#include "cpu/simd_avx512.h"
#include "cpu/quant_vbmi.h"
#include "cpu/adam_kernel.h"

using namespace offload_engine;
using Clock = std::chrono::steady_clock;

static double seconds_since(Clock::time_point t0) { return std::chrono::duration<double>(Clock::now() - t0).count(); }

template <class T>
static void io(FILE* f, std::vector<T>& v, bool write) {
  const size_t done = write ? fwrite(v.data(), sizeof(T), v.size(), f) : fread(v.data(), sizeof(T), v.size(), f);
  if (done != v.size()) throw std::runtime_error("short read or write");
}

static int run_kernel(const char* dir, int steps, int repeats) {
  // input.bin: int64 n, block; double lr, beta1, beta2, eps, weight_decay; float m_map[256],
  // v_map[256]; float param[n], grad[n]; uint8 m_codes[nb*block]; float m_absmax[nb]; same for v.
  const std::string in_path = std::string(dir) + "/input.bin", out_path = std::string(dir) + "/output.bin";
  FILE* f = fopen(in_path.c_str(), "rb");
  if (!f) return 2;
  int64_t hdr[2];
  double hyper[5];
  if (fread(hdr, 8, 2, f) != 2 || fread(hyper, 8, 5, f) != 5) return 2;
  const int64_t n = hdr[0], block = hdr[1], nb = (n + block - 1) / block;
  std::vector<float> m_map(256), v_map(256), p(n), g(n), m_absmax(nb), v_absmax(nb);
  std::vector<uint8_t> m_codes(nb * block), v_codes(nb * block);
  io(f, m_map, false); io(f, v_map, false); io(f, p, false); io(f, g, false);
  io(f, m_codes, false); io(f, m_absmax, false); io(f, v_codes, false); io(f, v_absmax, false);
  fclose(f);

  AdamBlockwiseArgs a{};
  a.param = p.data();
  a.grad = g.data();
  a.param_type = a.grad_type = ElemType::kFloat32;
  a.m_codes = m_codes.data(); a.m_absmax = m_absmax.data();
  a.v_codes = v_codes.data(); a.v_absmax = v_absmax.data();
  a.m_planes = plane_code_tables(m_map.data(), 256);
  a.v_planes = plane_code_tables(v_map.data(), 256);
  if (a.m_planes == nullptr || a.v_planes == nullptr) return 3;
  a.bits = 8; a.block = block; a.numel = n;
  auto step = [&](int64_t s) {
    a.coeffs = make_coeffs(hyper[0], hyper[1], hyper[2], hyper[3], hyper[4], s, /*adamw_mode=*/true,
                           /*bias_correction=*/true, /*maximize=*/false, /*grad_scale=*/1.0,
                           /*stochastic_rounding=*/false, /*seed=*/0, /*index_offset=*/0);
    adam_blocks_typed<simd_avx512::Vec, quant_vbmi::Codec, float, float>(a, 0, nb);
  };
  for (int s = 1; s <= steps; ++s) step(s);
  f = fopen(out_path.c_str(), "wb");
  if (!f) return 2;
  io(f, p, true); io(f, m_codes, true); io(f, m_absmax, true); io(f, v_codes, true); io(f, v_absmax, true);
  fclose(f);
  std::vector<double> ns;
  for (int r = 0; r < repeats; ++r) {
    const auto t0 = Clock::now();
    step(steps + 1 + r);
    ns.push_back(seconds_since(t0) / double(n) * 1e9);
  }
  std::sort(ns.begin(), ns.end());
  printf("{\"ns_per_param_min\": %.4f, \"ns_per_param_median\": %.4f}\n", ns.front(), ns[ns.size() / 2]);
  return 0;
}

// ---- instruction throughput: 12 independent chains of one instruction, in registers ----
static volatile int g_sink;
static void sink(__m512i x) { g_sink = _mm_cvtsi128_si32(_mm512_castsi512_si128(x)); }
static void sink(__m512 x) { g_sink = int(_mm512_cvtss_f32(x)); }

// n rounds of `op` on each of 12 chains started at init(0..11); the empty asm keeps every chain
// in a register and live, so the loop is neither spilled nor folded away.
template <class T, class Init, class Op>
__attribute__((always_inline)) inline void chains(int64_t n, Init init, Op op) {
  T a0 = init(0), a1 = init(1), a2 = init(2), a3 = init(3), a4 = init(4), a5 = init(5), a6 = init(6), a7 = init(7),
    a8 = init(8), a9 = init(9), a10 = init(10), a11 = init(11);
  for (int64_t i = 0; i < n; ++i) {
    a0 = op(a0); a1 = op(a1); a2 = op(a2); a3 = op(a3); a4 = op(a4); a5 = op(a5);
    a6 = op(a6); a7 = op(a7); a8 = op(a8); a9 = op(a9); a10 = op(a10); a11 = op(a11);
    asm volatile("" : "+v"(a0), "+v"(a1), "+v"(a2), "+v"(a3), "+v"(a4), "+v"(a5), "+v"(a6), "+v"(a7), "+v"(a8),
                 "+v"(a9), "+v"(a10), "+v"(a11));
  }
  for (T a : {a0, a1, a2, a3, a4, a5, a6, a7, a8, a9, a10, a11}) sink(a);
}
static __m512i bytes(int k) { return _mm512_set1_epi8(char(k)); }
static __m512 floats(int k) { return _mm512_set1_ps(1.5f + float(k)); }

__attribute__((noinline)) static void t_permi2b(int64_t n) {
  const __m512i t0 = bytes(3), t1 = bytes(5);
  chains<__m512i>(n, bytes, [&](__m512i a) { return _mm512_permutex2var_epi8(t0, a, t1); });
}
__attribute__((noinline)) static void t_permw(int64_t n) {
  const __m512i t0 = bytes(3);
  chains<__m512i>(n, bytes, [&](__m512i a) { return _mm512_permutexvar_epi16(a, t0); });
}
__attribute__((noinline)) static void t_unpack(int64_t n) {
  const __m512i t0 = bytes(3);
  chains<__m512i>(n, bytes, [&](__m512i a) { return _mm512_unpacklo_epi8(a, t0); });
}
__attribute__((noinline)) static void t_mul(int64_t n) {
  const __m512 d = _mm512_set1_ps(1.0000001f);
  chains<__m512>(n, floats, [&](__m512 a) { return _mm512_mul_ps(a, d); });
}
__attribute__((noinline)) static void t_sqrt(int64_t n) {
  chains<__m512>(n, floats, [](__m512 a) { return _mm512_sqrt_ps(a); });
}
__attribute__((noinline)) static void t_div(int64_t n) {
  const __m512 d = _mm512_set1_ps(1.0000001f);
  chains<__m512>(n, floats, [&](__m512 a) { return _mm512_div_ps(a, d); });
}
// The clock: a chain of dependent integer adds retires one per cycle.
__attribute__((noinline)) static void t_clock(int64_t n) {
  uint64_t x = 0;
  for (int64_t i = 0; i < n; ++i) asm volatile("add $1, %0\n\tadd $1, %0\n\tadd $1, %0\n\tadd $1, %0" : "+r"(x));
  g_sink = int(x);
}

static int run_throughput() {
  auto time = [](void (*fn)(int64_t), int64_t n) {
    double best = 1e30;
    for (int r = 0; r < 3; ++r) {
      const auto t0 = Clock::now();
      fn(n);
      best = std::min(best, seconds_since(t0));
    }
    return best;
  };
  const int64_t n_clock = 50000000, n = 2000000;
  const double hz = 4.0 * double(n_clock) / time(t_clock, n_clock);
  auto cycles = [&](void (*fn)(int64_t), int64_t iters) { return time(fn, iters) * hz / (12.0 * double(iters)); };
  printf("{\"ghz\": %.3f, \"vpermi2b\": %.3f, \"vpermw\": %.3f, \"vpunpcklbw\": %.3f, \"vmulps\": %.3f, "
         "\"vsqrtps\": %.3f, \"vdivps\": %.3f}\n",
         hz / 1e9, cycles(t_permi2b, n), cycles(t_permw, n), cycles(t_unpack, n), cycles(t_mul, n),
         cycles(t_sqrt, n / 8), cycles(t_div, n / 8));
  return 0;
}

int main(int argc, char** argv) {
  if (argc == 2 && std::strcmp(argv[1], "--throughput") == 0) return run_throughput();
  if (argc != 4) {
    fprintf(stderr, "usage: %s DIR STEPS REPEATS | --throughput\n", argv[0]);
    return 2;
  }
  return run_kernel(argv[1], std::atoi(argv[2]), std::atoi(argv[3]));
}
