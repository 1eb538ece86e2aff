#include "plane_tables.h"

#include <algorithm>
#include <cmath>
#include <cstring>
#include <limits>
#include <memory>
#include <mutex>
#include <vector>

namespace offload_engine {
namespace {

uint32_t bits_of(float x) { uint32_t b; std::memcpy(&b, &x, 4); return b; }
float float_of(uint32_t b) { float x; std::memcpy(&x, &b, 4); return x; }

constexpr int kBinades = 32;
constexpr uint32_t kOne = 127u << 23;  // bits of 1.0f: binade 31 starts here

// Number of thresholds strictly below x (thresholds sorted ascending).
int count_below(const std::vector<float>& thresholds, float x) {
  return int(std::lower_bound(thresholds.begin(), thresholds.end(), x) - thresholds.begin());
}

// Fewest mantissa bits (at most kMaxMantissaBits) that leave at most one of `magnitudes` (bit
// patterns inside the binade starting at `lo`) in each bucket; kMaxMantissaBits + 1 if none does.
constexpr int kMaxMantissaBits = 7;  // keys come from the top 16 bits of a float
int mantissa_bits_needed(const std::vector<uint32_t>& magnitudes, uint32_t lo) {
  for (int mb = 0; mb <= kMaxMantissaBits; ++mb) {
    std::vector<uint32_t> buckets;
    for (uint32_t m : magnitudes) buckets.push_back((m - lo) >> (23 - mb));
    std::sort(buckets.begin(), buckets.end());
    if (std::adjacent_find(buckets.begin(), buckets.end()) == buckets.end()) return mb;
  }
  return kMaxMantissaBits + 1;
}

bool build(const float* map, int n, PlaneCodeTables& t) {
  std::memset(&t, 0, sizeof(t));
  for (int c = 1; c < n; ++c)
    if (!(map[c - 1] <= map[c])) return false;  // unsorted or NaN: the count of thresholds is undefined
  std::vector<float> thresholds;
  for (int c = 0; c + 1 < n; ++c) thresholds.push_back((map[c] + map[c + 1]) / 2.0f);  // quant/maps.py: midpoints
  for (int c = 0; c < 256; ++c) {
    const uint32_t value = c < n ? bits_of(map[c]) : 0u;
    const uint32_t mid = c + 1 < n ? bits_of(thresholds[c]) : bits_of(std::numeric_limits<float>::infinity());
    for (int k = 0; k < 4; ++k) {
      t.value_planes[k][c] = uint8_t(value >> (8 * k));
      t.mid_planes[k][c] = uint8_t(mid >> (8 * k));
    }
  }
  t.negative_codes = map[0] < 0.0f;
  // Magnitudes of the thresholds per sign; every one must sit in binades 1..30.
  std::vector<uint32_t> by_sign[2];
  for (float th : thresholds) {
    if (!t.negative_codes && !(th > 0.0f)) return false;  // a non-negative map must code every x <= 0 as 0
    const uint32_t mag = bits_of(th) & 0x7FFFFFFFu;
    if (mag < uint32_t(kPlaneFirstExponent + 1) << 23 || mag >= kOne) return false;
    by_sign[th < 0.0f].push_back(mag);
  }
  int base = 0;
  for (int i = 0; i < kBinades; ++i) {
    if (i == 0 || i == kBinades - 1) {  // one key each: no thresholds there (checked above)
      t.shift[i] = 15;                   // the top 15 magnitude bits shifted out: always 0
      t.offset[i] = int16_t(-base);
      base += 1;
      continue;
    }
    const uint32_t lo = uint32_t(kPlaneFirstExponent + i) << 23, hi = lo + (1u << 23);
    int mb = 0;
    for (const auto& mags : by_sign) {
      std::vector<uint32_t> inside;
      for (uint32_t m : mags)
        if (m >= lo && m < hi) inside.push_back(m);
      mb = std::max(mb, mantissa_bits_needed(inside, lo));
    }
    if (mb > kMaxMantissaBits) return false;
    t.shift[i] = int16_t(kMaxMantissaBits - mb);
    t.offset[i] = int16_t(int32_t((lo >> 16) >> t.shift[i]) - base);
    base += 1 << mb;
  }
  t.keys_per_sign = base;
  if (base * (t.negative_codes ? 2 : 1) > 512) return false;
  // Each key's candidate: the thresholds below the smallest x of its bucket.
  for (int i = 0; i < kBinades; ++i) {
    const bool single = i == 0 || i == kBinades - 1;
    const int first = int32_t((uint32_t(kPlaneFirstExponent + i) << 7) >> t.shift[i]) - t.offset[i];
    const int count = single ? 1 : 1 << (kMaxMantissaBits - t.shift[i]);
    for (int k = first; k < first + count; ++k) {
      // The bucket's first and last float bit patterns (top 16 bits from the key).
      const uint32_t lo = i == 0 ? 0u : i == kBinades - 1 ? kOne : uint32_t(k + t.offset[i]) << (t.shift[i] + 16);
      const uint32_t last = i == 0 ? (uint32_t(kPlaneFirstExponent + 1) << 23) - 1
                                   : i == kBinades - 1 ? 0u : lo + (1u << (t.shift[i] + 16)) - 1;
      t.candidate[k] = uint8_t(count_below(thresholds, float_of(lo)));
      if (t.negative_codes) {
        const float smallest = i == kBinades - 1 ? -std::numeric_limits<float>::infinity() : -float_of(last);
        t.candidate[t.keys_per_sign + k] = uint8_t(count_below(thresholds, smallest));
      }
    }
  }
  return true;
}

struct Entry {
  std::vector<float> map;
  std::unique_ptr<PlaneCodeTables> tables;  // null: the map does not fit the layout
};

}  // namespace

const PlaneCodeTables* plane_code_tables(const float* map, int n_codes) {
  static std::mutex mutex;
  static std::vector<Entry> cache;  // entries are never removed: returned pointers stay valid
  constexpr size_t kMaxEntries = 64;
  std::lock_guard<std::mutex> lock(mutex);
  for (const Entry& e : cache)
    if (int(e.map.size()) == n_codes && std::memcmp(e.map.data(), map, sizeof(float) * n_codes) == 0)
      return e.tables.get();
  if (cache.size() >= kMaxEntries) return nullptr;  // unusual: many distinct maps; keep the gather path
  Entry e{std::vector<float>(map, map + n_codes), std::make_unique<PlaneCodeTables>()};
  if (!build(map, n_codes, *e.tables)) e.tables.reset();
  cache.push_back(std::move(e));
  return cache.back().tables.get();
}

}  // namespace offload_engine
