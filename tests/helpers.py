"""What the tests share: the float32 tolerance rule, and test-only rewards, in the reward registry
(rewards.register) once this module is imported (by conftest.py, and by tests/ranks_runner.py for its
multi-rank processes)."""
import torch

from rewards import REWARDS, register

# Float32 comparisons. Two float32 computations of one network quantity that differ only in the order
# of their sums (batch shape, chunking, another CPU's kernels, the thread count) agree to ~1e-6 of the
# magnitude of the terms summed (float32 eps 1.2e-7 times depth x sqrt(width) of these tiny nets).
# Each such comparison allows F32_REL = 1e-3 of that magnitude: a 1000x margin, and still 100x below
# every effect the tests look for (a wrong seed, adapter, reduction or scale changes a value by 10% or more).
F32_REL = 1e-3


def f32_atol(*terms) -> float:
    """F32_REL x the largest magnitude among `terms` (tensors or numbers): the tolerance of a float32
    comparison whose compared values are sums of those terms (e.g. CFG's (1 - w) v_u and w v_c)."""
    return F32_REL * max(float(t.detach().abs().max()) if isinstance(t, torch.Tensor) else abs(float(t))
                         for t in terms)


if "test_brightness" not in REWARDS:
    @register("test_brightness")
    def _brightness(device, dtype):
        """score = the mean pixel value: continuous in the pixels (no uint8 rounding), so two float32
        computations of one image that differ by rounding also score within rounding of each other, and
        runs that must agree can be compared with a tolerance (a JPEG size jumps with every pixel that
        rounds the other way). A prompt naming a dog scores 0.5 whatever the image: its whole group
        gets advantage 0."""
        def brightness(images, prompts, metadata):
            scores = images.detach().float().mean((1, 2, 3)).cpu()
            dog = torch.tensor(["dog" in p for p in prompts])
            return torch.where(dog, torch.full_like(scores, 0.5), scores), {}
        return brightness
