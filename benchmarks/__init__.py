"""The benchmark suite: tasks × methods on one budget, one runner, one report (not part of the library)."""
