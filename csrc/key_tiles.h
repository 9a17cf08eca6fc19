// Enumeration of the key tiles of a range of the virtual concatenation of all key sources; shared
// by the kernels and the host-side unit test.
#pragma once

#include <cstdint>

#include "attention.h"
#include "host_device.h"

namespace mplug {

// Keys [start, end) of one source: one tile of at most kKeysPerTile keys.
struct KeyTile {
  int source;
  int64_t start;
  int64_t end;
};

MPLUG_HD int64_t clamp_to(int64_t x, int64_t lo, int64_t hi) { return x < lo ? lo : (x > hi ? hi : x); }

// The key tiles of the concatenated sources restricted to [lo, hi), source by source; a tile never
// crosses a source boundary.
struct TileWalk {
  int64_t lo[kMaxSources];
  int64_t hi[kMaxSources];
  int64_t count[kMaxSources];
  int64_t total;

  MPLUG_HD static TileWalk over(const AttentionArgs& args, int64_t lo, int64_t hi) {
    TileWalk walk;
    walk.total = 0;
    int64_t offset = 0;
    for (int s = 0; s < kMaxSources; ++s) {
      const int64_t length = s < args.num_sources ? args.sources[s].length : 0;
      walk.lo[s] = clamp_to(lo - offset, 0, length);
      walk.hi[s] = clamp_to(hi - offset, 0, length);
      walk.count[s] = (walk.hi[s] - walk.lo[s] + kKeysPerTile - 1) / kKeysPerTile;
      walk.total += walk.count[s];
      offset += length;
    }
    return walk;
  }

  MPLUG_HD KeyTile at(int64_t index) const {
    for (int s = 0; s < kMaxSources; ++s) {
      if (index < count[s]) {
        const int64_t start = lo[s] + index * kKeysPerTile;
        const int64_t end = start + kKeysPerTile < hi[s] ? start + kKeysPerTile : hi[s];
        return KeyTile{s, start, end};
      }
      index -= count[s];
    }
    return KeyTile{0, 0, 0};
  }
};

}  // namespace mplug
