// hqexport::GridShortlist (ops/shortlist.py): per position, the logits copied, their k largest entries found
// (TopK's choice: of equal values the lower index), and each replaced by X . row, the row dequantized as
// GatherBlockQuantized does it: (code - zero point) * scale, one rounding, so the fp head's value exactly. One pass
// over the logits and k rows of the grid, where the function body's six stock nodes each dispatch and copy.
#include "shortlist.h"

#include <algorithm>
#include <cstring>
#include <memory>
#include <new>

namespace hqx {
namespace {

struct Entry {
  float value;
  int64_t index;
};

// TopK's order: a larger value first, and of equal values the lower index.
bool better(const Entry& a, const Entry& b) { return a.value > b.value || (a.value == b.value && a.index < b.index); }

// The k best entries of v[0, n) in kept[0, k) (in no order): a heap whose front is the worst one kept. A run of 8
// values none above that one's costs 8 comparisons and no heap work; a value equal to it comes later, so it is
// worse.
void top_k(const float* v, int64_t n, int64_t k, Entry* kept) {
  for (int64_t i = 0; i < k; ++i) kept[i] = {v[i], i};
  std::make_heap(kept, kept + k, better);
  constexpr int64_t kRun = 8;
  int64_t i = k;
  while (i < n) {
    const float worst = kept[0].value;
    if (i + kRun <= n) {
      bool above = false;
      for (int64_t j = 0; j < kRun; ++j) above |= v[i + j] > worst;
      if (!above) {
        i += kRun;
        continue;
      }
    }
    const int64_t end = std::min(n, i + kRun);
    for (; i < end; ++i) {
      const Entry entry{v[i], i};
      if (better(entry, kept[0])) {
        std::pop_heap(kept, kept + k, better);
        kept[k - 1] = entry;
        std::push_heap(kept, kept + k, better);
      }
    }
  }
}

// X . row `token` of the grid, in 8 float partial sums added pairwise.
float grid_dot(const Shortlist& s, const float* x, int64_t token) {
  const int64_t blocks = s.hidden / s.block_size;
  const uint8_t* codes = s.codes + token * s.hidden;
  float sums[8] = {};
  for (int64_t b = 0; b < blocks; ++b) {
    const float scale = s.scales[token * blocks + b];
    const int zero_point = s.zero_points[token * blocks + b];
    for (int64_t i = b * s.block_size; i < (b + 1) * s.block_size; ++i) {
      sums[i % 8] += static_cast<float>(static_cast<int>(codes[i]) - zero_point) * scale * x[i];
    }
  }
  return ((sums[0] + sums[1]) + (sums[2] + sums[3])) + ((sums[4] + sums[5]) + (sums[6] + sums[7]));
}

struct Job {
  const Shortlist* s;
  Entry* kept;  // [positions, k]
};

void position_task(void* data, size_t position) {
  const Job& job = *static_cast<const Job*>(data);
  const Shortlist& s = *job.s;
  const int64_t row = static_cast<int64_t>(position);
  const float* logits = s.logits + row * s.vocab;
  float* y = s.Y + row * s.vocab;
  std::memcpy(y, logits, static_cast<size_t>(s.vocab) * sizeof(float));
  Entry* kept = job.kept + row * s.k;
  top_k(logits, s.vocab, s.k, kept);
  for (int64_t i = 0; i < s.k; ++i) y[kept[i].index] = grid_dot(s, s.X + row * s.hidden, kept[i].index);
}

}  // namespace

bool grid_shortlist(const Shortlist& s, const Runner& runner) {
  const std::unique_ptr<Entry[]> kept(new (std::nothrow) Entry[static_cast<size_t>(s.positions * s.k)]);
  if (kept == nullptr) return false;
  Job job{&s, kept.get()};
  runner.parallel_for(runner.ctx, &position_task, static_cast<size_t>(s.positions), &job);
  return true;
}

}  // namespace hqx
