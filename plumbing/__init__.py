"""What every script needs and none is about: the config from the command line and the recipes, the
distributed helper, the run folder (checkpoints, lock, exact resume), trackers and model cards, where a
base model comes from, JSON reading and the one-line stops. The algorithm files call it through a small
surface; a reader of the paper can skip this folder."""
