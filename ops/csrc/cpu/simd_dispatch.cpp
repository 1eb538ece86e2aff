#include "simd_dispatch.h"

#include <c10/util/Exception.h>
#include <c10/util/StringUtil.h>
#include <cstdlib>
#include <cstring>

namespace offload_engine {

void adam_range_scalar(const AdamTensorArgs&, int64_t, int64_t);
void adam_range_avx2(const AdamTensorArgs&, int64_t, int64_t);
void adam_range_avx512(const AdamTensorArgs&, int64_t, int64_t);
void adam_blocks_scalar(const AdamBlockwiseArgs&, int64_t, int64_t);
void adam_blocks_avx2(const AdamBlockwiseArgs&, int64_t, int64_t);
void adam_blocks_avx512(const AdamBlockwiseArgs&, int64_t, int64_t);
void adam_blocks_avx512vbmi(const AdamBlockwiseArgs&, int64_t, int64_t);

namespace {
// Widest first: the order of auto selection and of supported_simd_paths().
constexpr SimdPath kPaths[] = {SimdPath::kAvx512Vbmi, SimdPath::kAvx512, SimdPath::kAvx2, SimdPath::kScalar};
}  // namespace

const char* simd_path_name(SimdPath path) {
  switch (path) {
    case SimdPath::kAvx512Vbmi: return "avx512vbmi";
    case SimdPath::kAvx512: return "avx512";
    case SimdPath::kAvx2: return "avx2";
    case SimdPath::kScalar: return "scalar";
  }
  return "?";
}

bool cpu_supports(SimdPath path) {
#if defined(__x86_64__) || defined(__i386__)
  // __builtin_cpu_supports also checks that the OS saves the wider registers (XCR0).
  switch (path) {
    case SimdPath::kAvx512Vbmi: return cpu_supports(SimdPath::kAvx512) && __builtin_cpu_supports("avx512bw") &&
                                       __builtin_cpu_supports("avx512vbmi");
    case SimdPath::kAvx512: return __builtin_cpu_supports("avx512f") && __builtin_cpu_supports("avx2") &&
                                   __builtin_cpu_supports("fma") && __builtin_cpu_supports("f16c");
    case SimdPath::kAvx2: return __builtin_cpu_supports("avx2") && __builtin_cpu_supports("fma") &&
                                 __builtin_cpu_supports("f16c");
    case SimdPath::kScalar: return true;
  }
  return false;
#else
  return path == SimdPath::kScalar;
#endif
}

std::vector<std::string> supported_simd_paths() {
  std::vector<std::string> out;
  for (SimdPath p : kPaths)
    if (cpu_supports(p)) out.emplace_back(simd_path_name(p));
  return out;
}

SimdPath selected_simd_path() {
  const char* env = std::getenv("OFFLOAD_ENGINE_SIMD");
  if (env == nullptr || *env == '\0' || std::strcmp(env, "auto") == 0) {
    for (SimdPath p : kPaths)
      if (cpu_supports(p)) return p;
    return SimdPath::kScalar;
  }
  for (SimdPath p : kPaths) {
    if (std::strcmp(env, simd_path_name(p)) == 0) {
      TORCH_CHECK_VALUE(cpu_supports(p), "OFFLOAD_ENGINE_SIMD=", env, " is not supported by this CPU; it supports: ",
                        c10::Join(", ", supported_simd_paths()));
      return p;
    }
  }
  TORCH_CHECK_VALUE(false, "OFFLOAD_ENGINE_SIMD='", env, "' is not a known path; allowed: auto, avx512vbmi, avx512, avx2, scalar");
}

AdamRangeFn adam_range_for(SimdPath path) {
  switch (path) {
    case SimdPath::kAvx512Vbmi:  // fp32 state has no lookups: the avx512 kernel
    case SimdPath::kAvx512: return &adam_range_avx512;
    case SimdPath::kAvx2: return &adam_range_avx2;
    case SimdPath::kScalar: return &adam_range_scalar;
  }
  return &adam_range_scalar;
}

AdamBlockwiseFn adam_blocks_for(SimdPath path) {
  switch (path) {
    case SimdPath::kAvx512Vbmi: return &adam_blocks_avx512vbmi;
    case SimdPath::kAvx512: return &adam_blocks_avx512;
    case SimdPath::kAvx2: return &adam_blocks_avx2;
    case SimdPath::kScalar: return &adam_blocks_scalar;
  }
  return &adam_blocks_scalar;
}

}  // namespace offload_engine
