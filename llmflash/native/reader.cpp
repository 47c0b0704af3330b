// The native flash reader: parallel positional reads (preadv) from one file descriptor into host memory, on a pool
// of C++ threads that never touch the Python interpreter (llmflash/storage.py's FlashReader uses it where it builds;
// its Python workers stay the reference and the fallback).
//
// A ticket is one submitted list of reads; read j reads nb[j] bytes at file offset fo[j] into the buffers
// iov[iov_start[j] .. iov_start[j + 1]) (offset, length) of the destination (one buffer, or a neuron cache's slots for a
// scatter read). Workers take reads one at a time from the oldest unfinished ticket (reads in flight = threads), so a
// ticket's reads spread over every thread and tickets finish in the order they were submitted. Short reads are
// finished like the Python path: retried while the progress stays a multiple of 512 bytes, and past the end of the
// file the rest of the destination is zeroed. Without O_DIRECT each read is followed by POSIX_FADV_DONTNEED.
//
// A ticket owns its read list. It comes either from a list made by the caller (llmflash_reader_submit: offsets and
// lengths, as FlashReader.submit takes them) or from neuron ids planned here (llmflash_reader_plan_rows, then
// llmflash_reader_submit_plan): runs of consecutive ids become one read each, landing in consecutive rows or row by
// row in a neuron cache's slots. The planner is the engine's hot path: the same reads as the Python reference
// (layout.read_plan / step.slot_plan), without a dozen numpy calls and list conversions per layer.
//
// Two ways to do the reads, chosen at llmflash_reader_new: a pool of threads, each with one blocking preadv in flight
// (reads in flight = threads; each read puts a thread to sleep and wakes it), or io_uring (Linux 5.6+): one thread
// keeps up to `depth` reads in flight in a ring and reaps their completions in batches, for less CPU per read (the
// engine's A/B: results/engine_options/uring_13th). Where the kernel refuses io_uring (an old kernel, a seccomp
// profile), the pool falls back to threads; llmflash_reader_uring says which it runs.
//
// C ABI (ctypes releases the interpreter lock during every call): llmflash_reader_new / _uring / _submit / _plan_new /
// _plan_rows / _plan_sizes / _submit_plan / _plan_free / _wait / _free.

#include <fcntl.h>
#include <sys/uio.h>
#include <unistd.h>

#if defined(__linux__) && defined(__has_include)
#if __has_include(<linux/io_uring.h>) && __has_include(<sys/eventfd.h>)
#define LLMFLASH_URING 1
#include <linux/io_uring.h>
#include <poll.h>
#include <sys/eventfd.h>
#include <sys/mman.h>
#include <sys/syscall.h>
#endif
#endif

#include <algorithm>
#include <atomic>
#include <cerrno>
#include <chrono>
#include <climits>
#include <condition_variable>
#include <cstdint>
#include <cstring>
#include <deque>
#include <mutex>
#include <thread>
#include <vector>

namespace {

constexpr int64_t kSector = 512;

int64_t now_ns() {
  return std::chrono::duration_cast<std::chrono::nanoseconds>(
             std::chrono::steady_clock::now().time_since_epoch()).count();
}

struct Ticket {
  int64_t n = 0;                   // reads
  std::vector<int64_t> fo;         // per read: file offset, bytes
  std::vector<int64_t> nb;
  std::vector<int64_t> iov_start;  // per read: its buffers are iov[iov_start[j] .. iov_start[j + 1])
  std::vector<struct iovec> iov;   // per buffer: where, how many bytes (preadv's and the ring's readv's list)
  std::atomic<int64_t> next{0};   // next read to hand out
  std::atomic<int64_t> left{0};   // reads not finished
  std::atomic<int64_t> bytes{0};  // bytes the kernel returned
  std::atomic<int> error{0};      // first errno met
  int64_t start_ns = 0;
  int64_t end_ns = 0;
  int64_t queued_ns = 0;           // when the submit call that queued it returned (written by the submitter)
  std::atomic<bool> done{false};  // (set under m, after end_ns; read without it by a waiter that spins)
  std::mutex m;
  std::condition_variable cv;
};

#ifdef LLMFLASH_URING
struct Ring {
  int fd = -1;
  unsigned *sq_tail = nullptr, *sq_mask = nullptr, *sq_array = nullptr;
  unsigned *cq_head = nullptr, *cq_tail = nullptr, *cq_mask = nullptr;
  struct io_uring_sqe* sqes = nullptr;
  struct io_uring_cqe* cqes = nullptr;
  void* sq_map = MAP_FAILED;
  size_t sq_bytes = 0;
  void* cq_map = MAP_FAILED;
  size_t cq_bytes = 0;
  void* sqe_map = MAP_FAILED;
  size_t sqe_bytes = 0;
};
#endif

struct Pool {
  int fd;
  bool direct;
  std::vector<std::thread> threads;
  std::deque<Ticket*> queue;  // tickets with reads not yet handed out, oldest first
  std::mutex m;
  std::condition_variable cv;
  bool stop = false;
  bool uring = false;  // io_uring: threads[0] is the ring's thread
  int depth = 0;       // io_uring: reads in flight at most
  int efd = -1;        // io_uring: written by a submitter while the ring's thread waits in the ring
  bool in_ring = false;  // (under m) the ring's thread waits for completions, not on cv
#ifdef LLMFLASH_URING
  Ring ring;
#endif
};

// Finish one buffer of a read from `got` bytes on; returns the bytes the kernel returned for it (zeroes past EOF).
int64_t finish(int fd, char* dst, int64_t len, int64_t file_off, int64_t got, int* err) {
  while (got > 0 && got < len && got % kSector == 0) {
    ssize_t more = pread(fd, dst + got, static_cast<size_t>(len - got), file_off + got);
    if (more < 0) {
      if (errno == EINTR) continue;
      *err = errno;
      return got;
    }
    if (more == 0) break;
    got += more;
  }
  if (got < len) std::memset(dst + std::max<int64_t>(got, 0), 0, static_cast<size_t>(len - std::max<int64_t>(got, 0)));
  return std::max<int64_t>(got, 0);
}

// One read of a ticket: returns the bytes the kernel returned; sets *err on a failure. ``first`` >= 0: what a first
// read of its first (at most IOV_MAX) buffers already returned (the ring's short read), finished from there.
int64_t do_read(const Pool& p, const Ticket& t, int64_t j, int* err, int64_t first = -1) {
  const int64_t a = t.iov_start[j], b = t.iov_start[j + 1];
  const int64_t want = t.nb[j];
  int64_t got = 0;
  // preadv takes at most IOV_MAX buffers: longer scatter lists go in several calls
  for (int64_t s = a; s < b; s += IOV_MAX) {
    const int64_t e = std::min<int64_t>(b, s + IOV_MAX);
    int64_t part = 0;
    for (int64_t i = s; i < e; ++i) part += static_cast<int64_t>(t.iov[i].iov_len);
    ssize_t r;
    if (s == a && first >= 0) {
      r = static_cast<ssize_t>(first);
    } else {
      do {
        r = preadv(p.fd, &t.iov[s], static_cast<int>(e - s), t.fo[j] + got);
      } while (r < 0 && errno == EINTR);
    }
    if (r < 0) {
      *err = errno;
      return got;
    }
    if (r < part) {  // short: finish each buffer not fully filled (or zero it past EOF)
      int64_t pos = 0, total = 0;
      for (int64_t i = s; i < e; ++i) {
        const int64_t len = static_cast<int64_t>(t.iov[i].iov_len);
        const int64_t have = std::min<int64_t>(std::max<int64_t>(r - pos, 0), len);
        total += have < len ? finish(p.fd, static_cast<char*>(t.iov[i].iov_base), len, t.fo[j] + got + pos, have, err)
                            : len;
        pos += len;
        if (*err) break;
      }
      got += total;
      // what follows a short read lies past the end of the file: zero the remaining buffers
      for (int64_t i = e; i < b; ++i) std::memset(t.iov[i].iov_base, 0, t.iov[i].iov_len);
      break;
    }
    got += r;
  }
  if (!p.direct && want > 0) posix_fadvise(p.fd, t.fo[j], want, POSIX_FADV_DONTNEED);
  return got;
}

// One read of ticket t is finished: count it, and wake the ticket's waiter after its last.
void read_done(Ticket* t, int64_t got, int err) {
  t->bytes.fetch_add(got);
  if (err) {
    int zero = 0;
    t->error.compare_exchange_strong(zero, err);
  }
  if (t->left.fetch_sub(1) == 1) {
    std::lock_guard<std::mutex> lock(t->m);
    t->end_ns = now_ns();
    t->done = true;
    t->cv.notify_all();
  }
}

void worker(Pool* p) {
  for (;;) {
    Ticket* t = nullptr;
    int64_t j = 0;
    bool more = false;
    {
      std::unique_lock<std::mutex> lock(p->m);
      p->cv.wait(lock, [p] { return p->stop || !p->queue.empty(); });
      if (p->queue.empty()) return;  // stopping, nothing queued
      t = p->queue.front();
      j = t->next.fetch_add(1);
      if (j + 1 >= t->n) p->queue.pop_front();  // its last read is handed out
      more = !p->queue.empty();
    }
    // reads left to hand out: wake one more reader (a chain: the submitter wakes one, each woken reader the next, so
    // the submitting thread is not preempted by a burst of wake-ups on a machine with few cores)
    if (more) p->cv.notify_one();
    int err = 0;
    const int64_t got = do_read(*p, *t, j, &err);
    read_done(t, got, err);
  }
}


#ifdef LLMFLASH_URING
int ring_enter(int fd, unsigned to_submit, unsigned min_complete, unsigned flags) {
  return static_cast<int>(syscall(__NR_io_uring_enter, fd, to_submit, min_complete, flags, nullptr, 0));
}

void ring_close(Ring& r) {
  if (r.sqe_map != MAP_FAILED) munmap(r.sqe_map, r.sqe_bytes);
  if (r.cq_map != MAP_FAILED && r.cq_map != r.sq_map) munmap(r.cq_map, r.cq_bytes);
  if (r.sq_map != MAP_FAILED) munmap(r.sq_map, r.sq_bytes);
  if (r.fd >= 0) close(r.fd);
  r = Ring();
}

// Set up a ring of `entries` submission slots; false (nothing held) where the kernel refuses.
bool ring_init(Ring& r, unsigned entries) {
  struct io_uring_params prm;
  std::memset(&prm, 0, sizeof prm);
  r.fd = static_cast<int>(syscall(__NR_io_uring_setup, entries, &prm));
  if (r.fd < 0) return false;
  r.sq_bytes = prm.sq_off.array + prm.sq_entries * sizeof(unsigned);
  r.cq_bytes = prm.cq_off.cqes + prm.cq_entries * sizeof(struct io_uring_cqe);
  const bool single = (prm.features & IORING_FEAT_SINGLE_MMAP) != 0;
  if (single) r.sq_bytes = r.cq_bytes = std::max(r.sq_bytes, r.cq_bytes);
  r.sq_map = mmap(nullptr, r.sq_bytes, PROT_READ | PROT_WRITE, MAP_SHARED | MAP_POPULATE, r.fd, IORING_OFF_SQ_RING);
  if (r.sq_map == MAP_FAILED) { ring_close(r); return false; }
  r.cq_map = single ? r.sq_map
                    : mmap(nullptr, r.cq_bytes, PROT_READ | PROT_WRITE, MAP_SHARED | MAP_POPULATE, r.fd, IORING_OFF_CQ_RING);
  if (r.cq_map == MAP_FAILED) { ring_close(r); return false; }
  r.sqe_bytes = prm.sq_entries * sizeof(struct io_uring_sqe);
  r.sqe_map = mmap(nullptr, r.sqe_bytes, PROT_READ | PROT_WRITE, MAP_SHARED | MAP_POPULATE, r.fd, IORING_OFF_SQES);
  if (r.sqe_map == MAP_FAILED) { ring_close(r); return false; }
  char* sq = static_cast<char*>(r.sq_map);
  char* cq = static_cast<char*>(r.cq_map);
  r.sq_tail = reinterpret_cast<unsigned*>(sq + prm.sq_off.tail);
  r.sq_mask = reinterpret_cast<unsigned*>(sq + prm.sq_off.ring_mask);
  r.sq_array = reinterpret_cast<unsigned*>(sq + prm.sq_off.array);
  r.cq_head = reinterpret_cast<unsigned*>(cq + prm.cq_off.head);
  r.cq_tail = reinterpret_cast<unsigned*>(cq + prm.cq_off.tail);
  r.cq_mask = reinterpret_cast<unsigned*>(cq + prm.cq_off.ring_mask);
  r.sqes = static_cast<struct io_uring_sqe*>(r.sqe_map);
  r.cqes = reinterpret_cast<struct io_uring_cqe*>(cq + prm.cq_off.cqes);
  return true;
}

// The next submission slot (zeroed), published by ring_publish. The caller never queues more than the ring holds.
struct io_uring_sqe* ring_sqe(Ring& r, unsigned& tail) {
  const unsigned idx = tail & *r.sq_mask;
  struct io_uring_sqe* e = &r.sqes[idx];
  std::memset(e, 0, sizeof *e);
  r.sq_array[idx] = idx;
  ++tail;
  return e;
}

void ring_publish(Ring& r, unsigned tail) { __atomic_store_n(r.sq_tail, tail, __ATOMIC_RELEASE); }

constexpr uint64_t kPollTag = ~0ull;  // user_data of the eventfd's poll

// The ring's thread: hands reads from the queue to the ring (at most p->depth in flight), waits for completions in
// the ring (a submitter wakes it through the eventfd, which a poll in the ring watches), and finishes each read. A
// read the kernel returns short or refuses with EAGAIN is done again with preadv (do_read: short reads and the end
// of the file handled as on the thread pool).
void uring_worker(Pool* p) {
  Ring& r = p->ring;
  struct Slot {
    Ticket* t;
    int64_t j;
  };
  std::vector<Slot> slots(static_cast<size_t>(p->depth));
  std::vector<int64_t> free_slots;
  for (int64_t k = p->depth - 1; k >= 0; --k) free_slots.push_back(k);
  int inflight = 0;
  bool poll_armed = false;
  std::vector<Slot> take;
  for (;;) {
    take.clear();
    {
      std::unique_lock<std::mutex> lock(p->m);
      p->in_ring = false;
      if (inflight == 0) {
        p->cv.wait(lock, [p] { return p->stop || !p->queue.empty(); });
        if (p->queue.empty()) return;  // stopping, nothing queued or in flight
      }
      while (inflight + static_cast<int>(take.size()) < p->depth && !p->queue.empty()) {
        Ticket* t = p->queue.front();
        const int64_t j = t->next.fetch_add(1);
        if (j + 1 >= t->n) p->queue.pop_front();
        take.push_back({t, j});
      }
      p->in_ring = true;  // from here a submitter writes the eventfd
    }
    unsigned tail = *r.sq_tail;
    unsigned queued = 0;
    if (!poll_armed) {
      struct io_uring_sqe* e = ring_sqe(r, tail);
      e->opcode = IORING_OP_POLL_ADD;
      e->fd = p->efd;
      e->poll_events = POLLIN;
      e->user_data = kPollTag;
      poll_armed = true;
      ++queued;
    }
    for (const Slot& s : take) {
      const Ticket& t = *s.t;
      const int64_t a = t.iov_start[s.j], b = t.iov_start[s.j + 1];
      if (b - a > IOV_MAX) {  // too many buffers for one readv: read here
        int err = 0;
        const int64_t got = do_read(*p, t, s.j, &err);
        read_done(s.t, got, err);
        continue;
      }
      const int64_t k = free_slots.back();
      free_slots.pop_back();
      slots[k] = s;
      struct io_uring_sqe* e = ring_sqe(r, tail);
      e->fd = p->fd;
      e->off = static_cast<uint64_t>(t.fo[s.j]);
      e->user_data = static_cast<uint64_t>(k);
      if (b - a == 1) {
        e->opcode = IORING_OP_READ;
        e->addr = reinterpret_cast<uint64_t>(t.iov[a].iov_base);
        e->len = static_cast<uint32_t>(t.iov[a].iov_len);
      } else {
        e->opcode = IORING_OP_READV;
        e->addr = reinterpret_cast<uint64_t>(&t.iov[a]);
        e->len = static_cast<uint32_t>(b - a);
      }
      ++inflight;
      ++queued;
    }
    ring_publish(r, tail);
    int rc;
    do {
      rc = ring_enter(r.fd, queued, inflight > 0 ? 1 : 0, IORING_ENTER_GETEVENTS);
    } while (rc < 0 && (errno == EINTR || errno == EAGAIN || errno == EBUSY));
    if (rc < 0) {  // the ring failed: finish what it holds with preadv (not expected)
      for (int64_t k = 0; k < p->depth; ++k) {
        if (std::find(free_slots.begin(), free_slots.end(), k) != free_slots.end()) continue;
        int err = 0;
        const int64_t got = do_read(*p, *slots[k].t, slots[k].j, &err);
        read_done(slots[k].t, got, err);
        free_slots.push_back(k);
      }
      inflight = 0;
      continue;
    }
    unsigned head = *r.cq_head;
    const unsigned ctail = __atomic_load_n(r.cq_tail, __ATOMIC_ACQUIRE);
    for (; head != ctail; ++head) {
      const struct io_uring_cqe& c = r.cqes[head & *r.cq_mask];
      if (c.user_data == kPollTag) {
        uint64_t v;
        ssize_t ignored = read(p->efd, &v, sizeof v);
        (void)ignored;
        poll_armed = false;
        continue;
      }
      const int64_t k = static_cast<int64_t>(c.user_data);
      const Slot s = slots[k];
      free_slots.push_back(k);
      --inflight;
      int err = 0;
      int64_t got = c.res;
      if (c.res == -EAGAIN || c.res == -EINTR) {  // nothing read: read it here
        got = do_read(*p, *s.t, s.j, &err);
      } else if (c.res >= 0 && c.res < s.t->nb[s.j]) {  // short (the end of the file): finished as preadv's would be
        got = do_read(*p, *s.t, s.j, &err, c.res);
      } else if (c.res < 0) {
        err = -c.res;
        got = 0;
      }
      read_done(s.t, got, err);
    }
    __atomic_store_n(r.cq_head, head, __ATOMIC_RELEASE);
  }
}

bool uring_start(Pool* p, int depth) {
  unsigned entries = 1;
  while (entries < static_cast<unsigned>(depth) + 1) entries <<= 1;  // + the eventfd's poll
  p->efd = eventfd(0, EFD_CLOEXEC | EFD_NONBLOCK);
  if (p->efd < 0) return false;
  if (!ring_init(p->ring, entries)) {
    close(p->efd);
    p->efd = -1;
    return false;
  }
  p->uring = true;
  p->depth = depth;
  p->threads.emplace_back(uring_worker, p);
  return true;
}

void uring_wake(Pool* p) {
  const uint64_t one = 1;
  ssize_t ignored = write(p->efd, &one, sizeof one);
  (void)ignored;
}
#endif

// Queue a ticket (its reads planned) and return it: the handle for llmflash_reader_wait.
void* enqueue(Pool* p, Ticket* t) {
  t->n = static_cast<int64_t>(t->fo.size());
  t->left.store(t->n);
  t->start_ns = now_ns();
  if (t->n <= 0) {
    t->done = true;
    t->queued_ns = t->start_ns;
    return t;
  }
  bool in_ring;
  {
    std::lock_guard<std::mutex> lock(p->m);
    p->queue.push_back(t);
    in_ring = p->in_ring;
  }
  // one reader woken here; it wakes the next while reads remain (``worker``): never more readers than reads, and the
  // submitting thread returns after one wake-up instead of being preempted by up to 16 of them on a 2-core machine.
  // The ring's thread waits either on cv (nothing in flight) or in the ring (woken through the eventfd).
  p->cv.notify_one();
#ifdef LLMFLASH_URING
  if (p->uring && in_ring) uring_wake(p);
#else
  (void)in_ring;
#endif
  t->queued_ns = now_ns();  // (the ticket is freed only by llmflash_reader_wait, called after this returns)
  return t;
}

}  // namespace

extern "C" {

int llmflash_reader_version() { return 6; }

// A pool reading from fd: with uring_depth > 0 and direct I/O, io_uring with that many reads in flight where the kernel
// allows it, else (or where it does not) n_threads threads.
void* llmflash_reader_new(int fd, int n_threads, int direct, int uring_depth) {
  Pool* p = new Pool();
  p->fd = fd;
  p->direct = direct != 0;
#ifdef LLMFLASH_URING
  if (uring_depth > 0 && p->direct && uring_start(p, uring_depth)) return p;  // (buffered reads need their fadvise)
#else
  (void)uring_depth;
#endif
  for (int i = 0; i < std::max(1, n_threads); ++i) p->threads.emplace_back(worker, p);
  return p;
}

// 1 where the pool reads through io_uring, 0 where it runs threads.
int llmflash_reader_uring(void* pool) { return static_cast<Pool*>(pool)->uring ? 1 : 0; }

// Queue n reads and return at once (a handle for llmflash_reader_wait): read j fills the buffers
// base + iov_off[i], iov_len[i] for i in [iov_start[j], iov_start[j + 1]). The lists are copied; the destination must
// stay alive and untouched until the wait.
void* llmflash_reader_submit(void* pool, char* base, int64_t n, const int64_t* fo, const int64_t* nb,
                             const int64_t* iov_start, const int64_t* iov_off, const int64_t* iov_len) {
  Ticket* t = new Ticket();
  if (n > 0) {
    t->fo.assign(fo, fo + n);
    t->nb.assign(nb, nb + n);
    t->iov_start.assign(iov_start, iov_start + n + 1);
    const int64_t k = iov_start[n];
    t->iov.resize(static_cast<size_t>(k));
    for (int64_t i = 0; i < k; ++i) t->iov[i] = {base + iov_off[i], static_cast<size_t>(iov_len[i])};
  }
  return enqueue(static_cast<Pool*>(pool), t);
}

// An empty read list to plan reads into (llmflash_reader_plan_rows), then queue (llmflash_reader_submit_plan) or free.
void* llmflash_reader_plan_new() {
  Ticket* t = new Ticket();
  t->iov_start.push_back(0);
  return t;
}

// Plan the reads that bring rows ids[0..n) (sorted, unique, each < file_rows) of one layer's segment, which starts at
// byte file_base of the file with rows of `stride` bytes, into a destination of dest_bytes bytes at `base`: into its
// rows slots[k] (one per id, a neuron cache's slots), or (slots == NULL) into consecutive rows from dest_row0. Runs of
// consecutive ids are one read each, split at max_run rows: layout.read_plan / step.slot_plan's reads. Returns 0; -1
// for ids not sorted, unique and in the layer, -2 for a destination row outside the buffer (nothing planned then).
int llmflash_reader_plan_rows(void* plan, char* base, int64_t dest_bytes, int64_t file_base, int64_t stride,
                              int64_t file_rows, int64_t n, const int64_t* ids, const int64_t* slots,
                              int64_t dest_row0, int64_t max_run) {
  Ticket* t = static_cast<Ticket*>(plan);
  if (n <= 0) return 0;
  if (stride <= 0 || max_run <= 0) return -1;
  const int64_t rows = dest_bytes / stride;
  for (int64_t k = 0; k < n; ++k) {
    if (ids[k] < 0 || ids[k] >= file_rows || (k > 0 && ids[k] <= ids[k - 1])) return -1;
    const int64_t row = slots != nullptr ? slots[k] : dest_row0 + k;
    if (row < 0 || row >= rows) return -2;
  }
  // at most one read and one buffer per id: room made once, not grown read by read
  t->fo.reserve(t->fo.size() + n);
  t->nb.reserve(t->nb.size() + n);
  t->iov_start.reserve(t->iov_start.size() + n);
  t->iov.reserve(t->iov.size() + n);
  int64_t k = 0;
  while (k < n) {
    int64_t len = 1;
    while (k + len < n && len < max_run && ids[k + len] == ids[k] + len) ++len;
    t->fo.push_back(file_base + ids[k] * stride);
    t->nb.push_back(len * stride);
    if (slots != nullptr) {
      for (int64_t i = 0; i < len; ++i) {
        t->iov.push_back({base + slots[k + i] * stride, static_cast<size_t>(stride)});
      }
    } else {
      t->iov.push_back({base + (dest_row0 + k) * stride, static_cast<size_t>(len * stride)});
    }
    t->iov_start.push_back(static_cast<int64_t>(t->iov.size()));
    k += len;
  }
  return 0;
}

// Queue a planned read list; it becomes the ticket (wait on the returned handle, do not free the plan).
void* llmflash_reader_submit_plan(void* pool, void* plan) {
  return enqueue(static_cast<Pool*>(pool), static_cast<Ticket*>(plan));
}

// Free a plan that was not submitted.
void llmflash_reader_plan_free(void* plan) { delete static_cast<Ticket*>(plan); }

// The reads planned so far: their count, and (out != NULL) their byte counts into out[0..count), for an observer
// that counts reads by size (before llmflash_reader_submit_plan, which hands the plan over).
int64_t llmflash_reader_plan_sizes(void* plan, int64_t* out) {
  const Ticket* t = static_cast<const Ticket*>(plan);
  const int64_t n = static_cast<int64_t>(t->nb.size());
  if (out != nullptr) std::memcpy(out, t->nb.data(), static_cast<size_t>(n) * sizeof(int64_t));
  return n;
}

// Block until a ticket's reads are done, free it and write out[0..4] = bytes, reads, elapsed ns (from its queueing to
// the later of its last read's end and the submit call's return), errno (0: none), ns the submit call took after
// queueing it (the hand-over: on few cores mostly the kernel's work of starting the reads, done in the caller's place).
// spin_ns > 0: first poll for that long, yielding the core between looks, before sleeping on the ticket: where cores
// are to spare, the waiter is not woken after the last read (tens of microseconds per wait on the GPU machine's host).
void llmflash_reader_wait(void* pool, void* ticket, int64_t* out, int64_t spin_ns) {
  (void)pool;
  Ticket* t = static_cast<Ticket*>(ticket);
  if (spin_ns > 0 && !t->done.load()) {
    const int64_t until = now_ns() + spin_ns;
    while (!t->done.load() && now_ns() < until) std::this_thread::yield();
  }
  {
    std::unique_lock<std::mutex> lock(t->m);
    t->cv.wait(lock, [t] { return t->done.load(); });
  }
  out[0] = t->bytes.load();
  out[1] = t->n > 0 ? t->n : 0;
  out[2] = (t->n > 0 ? std::max(t->end_ns, t->queued_ns) : t->start_ns) - t->start_ns;
  out[3] = t->error.load();
  out[4] = t->queued_ns - t->start_ns;
  delete t;
}

// Finish what is queued, stop the threads and free the pool (the caller closes the file).
void llmflash_reader_free(void* pool) {
  Pool* p = static_cast<Pool*>(pool);
  {
    std::lock_guard<std::mutex> lock(p->m);
    p->stop = true;
  }
  p->cv.notify_all();
#ifdef LLMFLASH_URING
  if (p->uring) uring_wake(p);
#endif
  for (auto& th : p->threads) th.join();
#ifdef LLMFLASH_URING
  if (p->uring) {
    ring_close(p->ring);
    close(p->efd);
  }
#endif
  delete p;
}

}  // extern "C"
