// One layer's neuron-cache bookkeeping (llmflash.cache.NeuronCache.update) without the interpreter: the same slot
// plan as the numpy reference, exactly (the tests compare them call by call).
//
// State (owned by the caller, numpy arrays, never reallocated):
//   ids[capacity]    neuron held by each slot, -1 if free
//   slot[d_ffn]      slot of each neuron, -1 if absent
//   last[d_ffn]      last step each neuron was needed
//   free_buf[capacity], *n_free   the free list: free slots, ascending
//   used_buf[capacity], *n_used   the used slots, ascending
// Policies: 0 = sliding window (a neuron expires once last <= step - window), 1 = LRU (nothing expires), 2 = LFU
// (nothing expires; ``score`` [d_ffn], float64, what each neuron is worth: a neuron needed at ``step`` and not yet
// counted at it gains ``inc``; llmflash.cache_policy.LFUPolicy). With ``pinned`` (uint8 [d_ffn], may be null) pinned
// neurons neither expire nor make room (the hot policy).
// Room for newcomers: cached neurons not needed at ``step`` go, least recently used first (ties: slot order); under
// LFU those worth least first (ties: least recently used, then slot order), each only for a newcomer worth more, the
// newcomers taken most valuable first (ties: lower id), the ones left out overflowing.
//
// Outputs (caller-allocated): out_load / out_dest [n_need] (neurons to read, ascending, and their slots: the lowest
// free ones), out_overflow [n_need] (needed, beyond capacity), out_ready [capacity] (slots cached before this call's
// loads). counts[0..4] = n_load, n_overflow, n_ready, deleted, n_missing.

#include <algorithm>
#include <functional>
#include <cstdint>
#include <vector>

extern "C" {

int32_t llmflash_cache_version() { return 3; }

static void free_slots(const std::vector<int64_t>& freed_sorted, int64_t* ids, int64_t* slot, int64_t* free_buf,
                       int64_t* n_free, int64_t* used_buf, int64_t* n_used) {
    if (freed_sorted.empty()) return;
    for (int64_t s : freed_sorted) {
        slot[ids[s]] = -1;
        ids[s] = -1;
    }
    // merge the freed slots (ascending) into the free list (ascending, disjoint from them), from the back
    int64_t i = *n_free - 1, j = (int64_t)freed_sorted.size() - 1, k = *n_free + (int64_t)freed_sorted.size() - 1;
    *n_free = k + 1;
    while (j >= 0) {
        if (i >= 0 && free_buf[i] > freed_sorted[j]) free_buf[k--] = free_buf[i--];
        else free_buf[k--] = freed_sorted[j--];
    }
    int64_t m = 0;  // the used list keeps its order, minus the freed
    for (int64_t u = 0; u < *n_used; ++u)
        if (ids[used_buf[u]] >= 0) used_buf[m++] = used_buf[u];
    *n_used = m;
}

// Sort (last use, slot) pairs, listed in slot order, by last use, ties in slot order. Under the window every cached
// neuron was used in the last few steps: a counting sort over that range; else (LRU: any range) a comparison sort.
static void order_by_last(std::vector<std::pair<int64_t, int64_t>>& cand) {
    if (cand.empty()) return;
    int64_t lo = cand[0].first, hi = lo;
    for (const auto& c : cand) {
        lo = std::min(lo, c.first);
        hi = std::max(hi, c.first);
    }
    uint64_t range = (uint64_t)(hi - lo) + 1;
    if (range > 4 * cand.size() + 64) {
        std::sort(cand.begin(), cand.end());
        return;
    }
    std::vector<int64_t> start(range + 1, 0);
    for (const auto& c : cand) ++start[c.first - lo + 1];
    for (uint64_t r = 0; r < range; ++r) start[r + 1] += start[r];
    std::vector<std::pair<int64_t, int64_t>> out(cand.size());
    for (const auto& c : cand) out[start[c.first - lo]++] = c;  // stable: slot order within one step
    cand.swap(out);
}

int32_t llmflash_cache_update(int64_t step, int32_t evict, int32_t policy, int64_t window, const uint8_t* pinned,
                              int64_t capacity, int64_t* ids, int64_t* slot, int64_t* last, int64_t* free_buf,
                              int64_t* n_free, int64_t* used_buf, int64_t* n_used, const int64_t* need, int64_t n_need,
                              int64_t* out_load, int64_t* out_dest, int64_t* out_overflow, int64_t* out_ready,
                              int64_t* counts, double* score, double inc) {
    if (policy == 2 && !score) return -1;
    if (policy == 2)
        for (int64_t i = 0; i < n_need; ++i)
            if (last[need[i]] != step) score[need[i]] += inc;
    for (int64_t i = 0; i < n_need; ++i) last[need[i]] = step;
    int64_t deleted = 0;
    std::vector<int64_t> freed;
    if (evict && policy == 0) {  // the window: what was last needed window or more steps ago
        for (int64_t u = 0; u < *n_used; ++u) {
            int64_t s = used_buf[u], id = ids[s];
            if (last[id] <= step - window && !(pinned && pinned[id])) freed.push_back(s);
        }
        deleted += (int64_t)freed.size();
        free_slots(freed, ids, slot, free_buf, n_free, used_buf, n_used);
    }
    int64_t n_missing = 0;  // out_load holds the missing neurons for now (ascending, as need is)
    for (int64_t i = 0; i < n_need; ++i)
        if (slot[need[i]] < 0) out_load[n_missing++] = need[i];
    const bool worth = policy == 2 && n_missing > *n_free;
    // LFU: the newcomers leave a heap most valuable first (ties: lower id), and only as many as may enter
    using Coming = std::pair<double, int64_t>;  // (-worth, id)
    const std::greater<Coming> first_coming;
    std::vector<Coming> coming;
    std::vector<int64_t> admitted;
    auto pop_coming = [&]() {
        std::pop_heap(coming.begin(), coming.end(), first_coming);
        admitted.push_back(coming.back().second);
        coming.pop_back();
    };
    if (worth) {
        coming.reserve((size_t)n_missing);
        for (int64_t i = 0; i < n_missing; ++i) coming.emplace_back(-score[out_load[i]], out_load[i]);
        std::make_heap(coming.begin(), coming.end(), first_coming);
        for (int64_t i = 0; i < *n_free; ++i) pop_coming();  // the free slots go to the most valuable
    }
    if (evict && n_missing > *n_free) {  // over capacity: drop neurons not needed now, least recently used first
        std::vector<std::pair<int64_t, int64_t>> cand;  // (last use, slot): slot order breaks ties, as a stable sort
        for (int64_t u = 0; u < *n_used; ++u) {
            int64_t s = used_buf[u], id = ids[s];
            if (last[id] < step && !(pinned && pinned[id])) cand.emplace_back(last[id], s);
        }
        int64_t k = std::min<int64_t>(n_missing - *n_free, (int64_t)cand.size());
        if (k > 0 && policy == 2) {  // worth least first (ties: least recently used, then slot); each goes only for a
            // newcomer worth more
            using Held = std::pair<double, std::pair<int64_t, int64_t>>;  // (worth, (last use, slot))
            const std::greater<Held> first_held;
            std::vector<Held> held;
            held.reserve(cand.size());
            for (const auto& c : cand) held.emplace_back(score[ids[c.second]], c);
            std::make_heap(held.begin(), held.end(), first_held);
            int64_t beats = 0;
            while (beats < k && held.front().first < -coming.front().first) {
                std::pop_heap(held.begin(), held.end(), first_held);
                cand[(size_t)beats++] = held.back().second;
                held.pop_back();
                pop_coming();
            }
            k = beats;
        } else if (k > 0) {
            order_by_last(cand);
        }
        if (k > 0) {
            freed.clear();
            for (int64_t c = 0; c < k; ++c) freed.push_back(cand[c].second);
            std::sort(freed.begin(), freed.end());
            deleted += k;
            free_slots(freed, ids, slot, free_buf, n_free, used_buf, n_used);
        }
    }
    int64_t n_ready = *n_used;
    std::copy(used_buf, used_buf + n_ready, out_ready);
    int64_t n_load = std::min(n_missing, *n_free), n_over = n_missing - n_load;
    if (worth) {  // the admitted and the left out, each in id order again
        if ((int64_t)admitted.size() != n_load) return -2;  // (cannot happen: each eviction admits one)
        std::sort(admitted.begin(), admitted.end());
        std::copy(admitted.begin(), admitted.end(), out_load);
        for (size_t i = 0; i < coming.size(); ++i) out_load[n_load + (int64_t)i] = coming[i].second;
        std::sort(out_load + n_load, out_load + n_missing);
    }
    std::copy(out_load + n_load, out_load + n_missing, out_overflow);
    for (int64_t i = 0; i < n_load; ++i) {
        int64_t s = free_buf[i];
        out_dest[i] = s;
        ids[s] = out_load[i];
        slot[out_load[i]] = s;
    }
    if (n_load) {
        std::copy(free_buf + n_load, free_buf + *n_free, free_buf);
        *n_free -= n_load;
        int64_t m = 0;
        for (int64_t s = 0; s < capacity; ++s)
            if (ids[s] >= 0) used_buf[m++] = s;
        *n_used = m;
    }
    counts[0] = n_load;
    counts[1] = n_over;
    counts[2] = n_ready;
    counts[3] = deleted;
    counts[4] = n_missing;
    return 0;
}

// Sorted unique ids with every gap of at most max_gap missing ids between two of them filled in (llmflash.layout.bridge):
// written to out (room for ids[n - 1] - ids[0] + 1); returns how many.
int64_t llmflash_bridge(const int64_t* ids, int64_t n, int64_t max_gap, int64_t* out) {
    int64_t m = 0;
    for (int64_t i = 0; i < n; ++i) {
        if (i > 0) {
            const int64_t gap = ids[i] - ids[i - 1] - 1;
            if (gap > 0 && gap <= max_gap)
                for (int64_t v = ids[i - 1] + 1; v < ids[i]; ++v) out[m++] = v;
        }
        out[m++] = ids[i];
    }
    return m;
}

}  // extern "C"
