// hqexport::GridShortlist's computation (ops/shortlist.py); custom_op.cpp checks the node and calls it.
#pragma once

#include <cstdint>

#include "problem.h"

namespace hqx {

struct Shortlist {
  int64_t positions = 0;   // rows of logits and X (their leading dims multiplied)
  int64_t vocab = 0;       // V
  int64_t hidden = 0;      // H
  int64_t k = 0;           // entries recomputed per position, 1 <= k <= V
  int64_t block_size = 0;  // inputs per scale, dividing H
  const float* logits = nullptr;       // [positions, V]
  const float* X = nullptr;            // [positions, H]
  const uint8_t* codes = nullptr;      // [V, H]
  const float* scales = nullptr;       // [V, H / block_size]
  const uint8_t* zero_points = nullptr;  // [V, H / block_size]
  float* Y = nullptr;                  // [positions, V]
};

// Y = logits, each position's k largest entries replaced by X . row. False when out of memory.
bool grid_shortlist(const Shortlist& s, const Runner& runner);

}  // namespace hqx
