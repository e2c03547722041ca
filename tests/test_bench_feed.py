"""bench/bench_feed.py's judgement of its figures: warm-up rounds left out, small samples not judged, a next step
after MISSED, the README's thresholds (the timings themselves are benched, not tested)."""
import os
import re

from bench import bench_feed

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


class SlowFirstBench:
    """Bench's measuring methods, each 10x slower on its first call (tracing, caches), counting calls."""
    normalised = cov = None

    def __init__(self):
        self.calls = {}
        self.resident = type("Batch", (), {"lighting": None})()
        self.prep, self.prep_plain, self.pca, self.eigh = "prep", "prep_plain", "pca", "eigh"

    def _rate(self, name, fast):
        self.calls[name] = self.calls.get(name, 0) + 1
        return fast / 10 if self.calls[name] == 1 else fast

    def model(self):
        return self._rate("model", 100.0)

    def feed(self, prep, lighting=True):
        return self._rate("feed" if lighting else "feed_no_pca", 300.0)

    def loop(self):
        return self._rate("loop", 99.0)

    def per_batch(self, fn, *inputs):
        return 1 / self._rate("pca" if fn is self.pca else "eigh", 1000.0)


def test_feed_bench_leaves_warm_up_rounds_out_of_its_figures():
    bench = SlowFirstBench()
    rates, pca, eigh = bench_feed.measure_rounds(bench, rounds=2, warmup_rounds=1)
    assert rates == {"model": [100.0, 100.0], "feed": [300.0, 300.0], "loop": [99.0, 99.0],
                     "feed_no_pca": [300.0, 300.0]}
    assert pca == eigh == [0.001, 0.001]
    assert set(bench.calls.values()) == {3}


def test_feed_bench_does_not_judge_a_sample_of_one_round():
    rates = {"model": [100.0], "feed": [120.0], "loop": [78.7], "feed_no_pca": [130.0]}
    lines = bench_feed.verdict_lines(rates)
    assert "MISSED" not in "\n".join(lines) and "met" not in "\n".join(lines)
    assert any(re.search(r"1 measured round is too few to judge.*--rounds 3", line) for line in lines), lines


def test_feed_bench_names_the_next_step_after_a_missed_target():
    rates = {"model": [100.0] * 3, "feed": [80.0] * 3, "loop": [70.0] * 3, "feed_no_pca": [300.0] * 3}
    text = "\n".join(bench_feed.verdict_lines(rates))
    assert "loop/model: 0.700" in text and "MISSED" in text
    assert "pca_std" in text  # the feed is the bottleneck and the PCA lighting costs most of it: says so
    rates["feed"] = rates["feed_no_pca"] = [300.0] * 3  # the feed keeps up: the loop loses time elsewhere
    text = "\n".join(bench_feed.verdict_lines(rates))
    assert "loop/model: 0.700" in text and "num_of_threads" in text and "feed/model: 3.000" in text


def test_feed_bench_targets_are_the_readmes_thresholds():
    with open(os.path.join(ROOT, "README.md"), encoding="utf-8") as f:
        readme = " ".join(f.read().split())
    loop = re.search(r"loop/model is the share of the GPU's speed the pipeline delivers \(>= ([\d.]+)", readme)
    feed = re.search(r"feed/model is the headroom \(below ~([\d.]+) the feed side limits", readme)
    assert loop and feed
    assert (bench_feed.TARGET_LOOP, bench_feed.TARGET_FEED) == (float(loop.group(1)), float(feed.group(1)))
    assert f"target >= {bench_feed.TARGET_FEED:g}" in " ".join(bench_feed.__doc__.split())
