// Builds and caches the in-register lookup tables of a code map (PlaneCodeTables in
// adam_args.h) for the avx512vbmi path. Plain C++: compiled for the baseline target.
#pragma once
#include <cstdint>
#include "adam_args.h"

namespace offload_engine {

// The tables of a sorted float32 map of 16 or 256 codes, built on first use and cached by
// the map's contents (so the result never dangles and a map tensor may be freed). Returns
// null when the map's thresholds do not fit the layout (more than 512 keys, or a threshold
// of magnitude below 2^(kPlaneFirstExponent+1-127) or at least 1); callers then keep the
// gather path, which handles any map. Thread-safe.
const PlaneCodeTables* plane_code_tables(const float* map, int n_codes);

}  // namespace offload_engine
