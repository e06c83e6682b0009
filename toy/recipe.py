"""The toy recipe: every value the scripts use on the embedded toy world instead of the paper's, and why.

The scripts' defaults are the paper's recipe (SD3.5-Medium, 512 px, thousands of GPU steps; paper
sections 7-8). On the embedded 32-px toy model (models/toy-sd3) a run has minutes of 2 CPU cores, so
a few values are scaled. They are applied only when the base is the toy model (`--recipe auto`, the
default) or with `--recipe toy`, never to a key given on the command line, and every value applied is
printed at start and saved in the run's config.json (its "recipe" says which recipe was in force).

    TOY_RECIPE[script][key] = (value, reason)
"""
RES = "the toy model's own resolution (32 px); the paper samples SD3.5-M at 512 px"
SHORT = "a toy run is 60-200 steps, not thousands: an EMA updated every 8 steps would lag the whole run"

TOY_RECIPE = {
    "opd": {
        "height": (0, RES),
        "width": (0, RES),
        "lr": (1e-3, "60 rounds on 2 CPU cores instead of ~11 GPU-hours: the paper's 3e-4 distils a third as far"),
        "ema_every": (1, SHORT),
        "prompts_per_batch": (16, "16 prompts per task and round fill 2 CPU processes (the paper: 3 per GPU x 8 GPUs)"),
        "steps": (60, "60 rounds distil the three toy teachers in ~15 min on 2 cores"),
        "eval_every": (60, "one evaluation of the three tasks costs ~1 min of that budget: evaluate once, at the end"),
        "train_chunk": (16, "CPU: 16 rows per student forward+backward is 1.10x faster than all of a rank's "
                            "rows at once (docs/bench.md)"),
    },
    "teacher_rl": {
        "height": (0, RES),
        "width": (0, RES),
        "ema_every": (1, SHORT),
        "batch": (32, "32 images per step (4 prompts x 8) fit a 2-core step of ~4 s (Flow-GRPO: 48 prompts x 24)"),
        "group_size": (8, "8 images per prompt in a 32-image step (Flow-GRPO: 24)"),
        "updates_per_rollout": (1, "one optimizer step per 32-image rollout batch (Flow-GRPO: 2 per 1,152 images)"),
        "per_group_std": (True, "with 4 groups per step the global std mixes prompts of very different difficulty"),
        "kl_beta": (0.0, "runs of 100-200 steps do not drift far from the base (Flow-GRPO: 0.04)"),
        "timestep_fraction": (0.6, "6 of 10 steps trained: 40% less compute per step within the 15-min budget"),
        "rollout_batch": (32, "CPU: one rollout forward for the whole step (GPU memory sets Flow-GRPO's 9)"),
        "train_batch": (32, "CPU: one training forward for the whole step (GPU memory sets Flow-GRPO's 9)"),
    },
    "nft": {
        "height": (0, RES),
        "width": (0, RES),
        "batch": (32, "32 images per step (4 prompts x 8) fit a 2-core step of a few seconds (NVlabs: 48 x 24)"),
        "group_size": (8, "8 images per prompt in a 32-image step (NVlabs: 24)"),
        "rollout_batch": (32, "CPU: one rollout forward for the whole step (GPU memory sets NVlabs' 9)"),
        "train_batch": (32, "CPU: one training forward for the whole step (GPU memory sets NVlabs' 9)"),
    },
}
