"""The rewards of paper section 10: the registry (registry.py: the signature, `register`, `make_reward`,
the dry run's checks) and one file per family, each registering its rewards when the package is
imported: clip.py (PickScore, CLIPScore, LAION aesthetic), ocr.py, geneval.py (with rules.py, GenEval's
and OCR's scoring rules), http.py (a reward server), preference.py (HPSv2.1, ImageReward), jpeg.py.
"""
from rewards.registry import (CHECKS, PROMPT_RULES, REWARD_MODELS, REWARDS, SETTINGS_ENV, ComposedReward, check_spec,
                              importable, load_reward, make_reward, parse_spec, register, reward_bytes)
from rewards import clip, geneval, http, jpeg, ocr, preference  # each registers its rewards

__all__ = ["CHECKS", "PROMPT_RULES", "REWARD_MODELS", "REWARDS", "SETTINGS_ENV", "ComposedReward", "check_spec",
           "importable", "load_reward", "make_reward", "parse_spec", "register", "reward_bytes",
           "clip", "geneval", "http", "jpeg", "ocr", "preference"]
