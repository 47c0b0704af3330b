"""Figure 2b: random-read throughput of this machine's disk versus read size and parallel reads (measured).

Calls ``research.profile_io.profile_io`` on the cache directory's filesystem (where the flash directories live),
page cache bypassed (O_DIRECT), each point the median of several interleaved runs. The result,
``results/profile_io/profile.json``, is also the bandwidth table that the other experiments use to compute I/O time
as bytes / bandwidth at the read size.
"""

from __future__ import annotations

from llmflash.paths import cache_dir
from research.profile_io import CHUNK_SIZES, THREAD_COUNTS, format_table, plot_profile, profile_io

import common

QUICK_CHUNKS = (4096, 8192, 16384, 32768, 65536, 262144, 1048576)
QUICK_THREADS = (1, 16, 32)
SMOKE_CHUNKS, SMOKE_THREADS = (4096, 65536), (1, 4)  # LLMFLASH_SMOKE=1
# The paper's M1 Max SSD (Figure 2b and the text), for reference on the plot.
PAPER = [(8192, 1.25, "paper M1 Max, 8 KiB random"), (16384, 2.25, "paper M1 Max, 16 KiB bundles"),
         (1 << 20, 6.1, "paper M1 Max, sequential")]


def main() -> None:
    p = common.parser("profile_io", __doc__, models=False)
    p.add_argument("--size-gb", type=float, default=1.0, help="test file size (reused when present)")
    p.add_argument("--repeats", type=int, default=None, help="runs per point (default 3 quick, 5 full)")
    args = p.parse_args()
    repeats = args.repeats or (3 if args.quick else 5)
    kw = dict(chunk_sizes=QUICK_CHUNKS, thread_counts=QUICK_THREADS, reads_per_point=1000) if args.quick else \
        dict(chunk_sizes=sorted(set(CHUNK_SIZES) | {8192}), thread_counts=THREAD_COUNTS)
    if common.smoke():  # the test suite's end-to-end tier: a few small reads (at least 64 per point, whatever the size)
        repeats, kw = args.repeats or 1, dict(chunk_sizes=SMOKE_CHUNKS, thread_counts=SMOKE_THREADS, reads_per_point=64)
    rows = profile_io(cache_dir(), int(args.size_gb * 1e9), repeats=repeats, **kw)
    print(format_table(rows))
    out = args.out
    common.save(out, "profile", args, data={"label": "measured", "rows": rows, "paper_reference": PAPER},
                rows=rows, extra_config={"repeats": repeats, "dir": str(cache_dir()), **{k: list(v) for k, v in kw.items()
                                                                                        if k != "reads_per_point"}})
    plot_profile(rows, out / "profile.png", reference=PAPER)


if __name__ == "__main__":
    main()
