"""Task details that decide what a benchmark number means."""
import torch

from benchmarks.tasks import get_task


def test_vgg_quick_scores_a_class_balanced_subset_of_a_class_sorted_test_set():
    task = get_task("vgg19-cifar10")(budget="quick")
    task.test_y = torch.arange(10).repeat_interleave(1000)      # stored class by class, as on disk
    task.test_x = torch.zeros(10_000, 1)
    idx = task.eval_index()
    assert len(idx) == 2000 and len(set(idx.tolist())) == 2000
    assert torch.bincount(task.test_y[idx]).tolist() == [200] * 10
    full = get_task("vgg19-cifar10")(budget="full")
    full.test_x, full.test_y = task.test_x, task.test_y
    assert torch.equal(full.eval_index(), torch.arange(10_000))
