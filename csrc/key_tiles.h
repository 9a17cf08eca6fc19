// Key tiles of the virtual concatenation of all key sources (kKeysPerTile keys, a tile's rows possibly from
// several sources) and where each source starts; shared by the forward and backward kernels and the host-side
// unit test.
#pragma once

#include <cstdint>

#include "attention.h"
#include "host_device.h"

namespace mplug {

// Keys [start, end) of the concatenated key index: one tile of at most kKeysPerTile keys.
struct KeyTile {
  int64_t start;
  int64_t end;
};

// Where concatenated key `key` lives: row `row` of source `source`.
struct KeyRow {
  int source;
  int64_t row;
};

// Where the sources start in the concatenated key index (source s holds keys [start(s), start(s + 1))),
// and its tiles: tile t holds keys [t kKeysPerTile, min((t + 1) kKeysPerTile, total)).
struct ConcatKeys {
  int64_t s1, s2, s3, total;

  MPLUG_HD static ConcatKeys of(const AttentionArgs& args) {
    int64_t start[kMaxSources + 1] = {0, 0, 0, 0, 0};
    for (int s = 0; s < kMaxSources; ++s) start[s + 1] = start[s] + (s < args.num_sources ? args.sources[s].length : 0);
    return ConcatKeys{start[1], start[2], start[3], start[4]};
  }
  // The source holding `key` (for key < total; an empty source holds none).
  MPLUG_HD int source_of(int64_t key) const {
    return static_cast<int>(key >= s1) + static_cast<int>(key >= s2) + static_cast<int>(key >= s3);
  }
  MPLUG_HD int64_t start(int s) const { return s == 0 ? 0 : (s == 1 ? s1 : (s == 2 ? s2 : (s == 3 ? s3 : total))); }
  MPLUG_HD KeyRow locate(int64_t key) const {
    const int s = source_of(key);
    return KeyRow{s, key - start(s)};
  }
  MPLUG_HD int64_t tile_count() const { return (total + kKeysPerTile - 1) / kKeysPerTile; }
  // Tile t (empty, start >= end, past the last tile).
  MPLUG_HD KeyTile tile(int64_t t) const {
    const int64_t start = t * kKeysPerTile;
    return KeyTile{start, start + kKeysPerTile < total ? start + kKeysPerTile : total};
  }
};

}  // namespace mplug
