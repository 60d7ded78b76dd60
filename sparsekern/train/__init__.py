"""Training and adversarial-training loops that work on any model, dense or truly sparse."""
from sparsekern.train.loops import (adversarial_step, evaluate, fast_adversarial_step,
                                    train_epoch, train_step)

__all__ = ["adversarial_step", "evaluate", "fast_adversarial_step", "train_epoch", "train_step"]
