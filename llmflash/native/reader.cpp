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
// C ABI (ctypes releases the interpreter lock during every call): llmflash_reader_new / _submit / _wait / _free.

#include <fcntl.h>
#include <sys/uio.h>
#include <unistd.h>

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
  char* base;
  int64_t n;
  const int64_t* fo;
  const int64_t* nb;
  const int64_t* iov_start;
  const int64_t* iov_off;
  const int64_t* iov_len;
  std::atomic<int64_t> next{0};   // next read to hand out
  std::atomic<int64_t> left{0};   // reads not finished
  std::atomic<int64_t> bytes{0};  // bytes the kernel returned
  std::atomic<int> error{0};      // first errno met
  int64_t start_ns = 0;
  int64_t end_ns = 0;
  bool done = false;
  std::mutex m;
  std::condition_variable cv;
};

struct Pool {
  int fd;
  bool direct;
  std::vector<std::thread> threads;
  std::deque<Ticket*> queue;  // tickets with reads not yet handed out, oldest first
  std::mutex m;
  std::condition_variable cv;
  bool stop = false;
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

// One read of a ticket: returns the bytes the kernel returned; sets *err on a failure.
int64_t do_read(const Pool& p, const Ticket& t, int64_t j, int* err) {
  const int64_t a = t.iov_start[j], b = t.iov_start[j + 1];
  const int64_t want = t.nb[j];
  int64_t got = 0;
  // preadv takes at most IOV_MAX buffers: longer scatter lists go in several calls
  for (int64_t s = a; s < b; s += IOV_MAX) {
    const int64_t e = std::min<int64_t>(b, s + IOV_MAX);
    struct iovec iov[IOV_MAX];
    int64_t part = 0;
    for (int64_t i = s; i < e; ++i) {
      iov[i - s].iov_base = t.base + t.iov_off[i];
      iov[i - s].iov_len = static_cast<size_t>(t.iov_len[i]);
      part += t.iov_len[i];
    }
    ssize_t r;
    do {
      r = preadv(p.fd, iov, static_cast<int>(e - s), t.fo[j] + got);
    } while (r < 0 && errno == EINTR);
    if (r < 0) {
      *err = errno;
      return got;
    }
    if (r < part) {  // short: finish each buffer not fully filled (or zero it past EOF)
      int64_t pos = 0, total = 0;
      for (int64_t i = s; i < e; ++i) {
        const int64_t len = t.iov_len[i];
        const int64_t have = std::min<int64_t>(std::max<int64_t>(r - pos, 0), len);
        total += have < len ? finish(p.fd, t.base + t.iov_off[i], len, t.fo[j] + got + pos, have, err) : len;
        pos += len;
        if (*err) break;
      }
      got += total;
      // what follows a short read lies past the end of the file: zero the remaining buffers
      for (int64_t i = e; i < b; ++i) std::memset(t.base + t.iov_off[i], 0, static_cast<size_t>(t.iov_len[i]));
      break;
    }
    got += r;
  }
  if (!p.direct && want > 0) posix_fadvise(p.fd, t.fo[j], want, POSIX_FADV_DONTNEED);
  return got;
}

void worker(Pool* p) {
  for (;;) {
    Ticket* t = nullptr;
    int64_t j = 0;
    {
      std::unique_lock<std::mutex> lock(p->m);
      p->cv.wait(lock, [p] { return p->stop || !p->queue.empty(); });
      if (p->queue.empty()) return;  // stopping, nothing queued
      t = p->queue.front();
      j = t->next.fetch_add(1);
      if (j + 1 >= t->n) p->queue.pop_front();  // its last read is handed out
    }
    int err = 0;
    const int64_t got = do_read(*p, *t, j, &err);
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
}

}  // namespace

extern "C" {

int llmflash_reader_version() { return 1; }

void* llmflash_reader_new(int fd, int n_threads, int direct) {
  Pool* p = new Pool();
  p->fd = fd;
  p->direct = direct != 0;
  for (int i = 0; i < std::max(1, n_threads); ++i) p->threads.emplace_back(worker, p);
  return p;
}

// Queue a ticket's reads and return at once: a handle for llmflash_reader_wait. The arrays and the destination must
// stay alive and untouched until then.
void* llmflash_reader_submit(void* pool, char* base, int64_t n, const int64_t* fo, const int64_t* nb,
                             const int64_t* iov_start, const int64_t* iov_off, const int64_t* iov_len) {
  Pool* p = static_cast<Pool*>(pool);
  Ticket* t = new Ticket();
  t->base = base;
  t->n = n;
  t->fo = fo;
  t->nb = nb;
  t->iov_start = iov_start;
  t->iov_off = iov_off;
  t->iov_len = iov_len;
  t->left.store(n);
  t->start_ns = now_ns();
  if (n <= 0) {
    t->done = true;
    return t;
  }
  {
    std::lock_guard<std::mutex> lock(p->m);
    p->queue.push_back(t);
  }
  // as many readers as reads, not the whole pool: on 2 cores, waking 16 readers for a handful of reads slowed
  // predictor mode (an alternating A/B on smollm2-relu, 2026-11-29: see the session's note)
  if (n < static_cast<int64_t>(p->threads.size())) {
    for (int64_t i = 0; i < n; ++i) p->cv.notify_one();
  } else {
    p->cv.notify_all();
  }
  return t;
}

// Block until a ticket's reads are done, free it and write out[0..3] = bytes, reads, elapsed ns, errno (0: none).
void llmflash_reader_wait(void* pool, void* ticket, int64_t* out) {
  (void)pool;
  Ticket* t = static_cast<Ticket*>(ticket);
  {
    std::unique_lock<std::mutex> lock(t->m);
    t->cv.wait(lock, [t] { return t->done; });
  }
  out[0] = t->bytes.load();
  out[1] = t->n > 0 ? t->n : 0;
  out[2] = (t->n > 0 ? t->end_ns : t->start_ns) - t->start_ns;
  out[3] = t->error.load();
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
  for (auto& th : p->threads) th.join();
  delete p;
}

}  // extern "C"
