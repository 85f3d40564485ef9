"""The method's stages: each training stage a recipe (`kdp.train.Recipe`: the model,
optimizer, step and finish) that both executors run with `fit_local` or Ray Train; the
training AEs (aes.py) and the evaluation (evaluate.py); the graph's task and driver stages
(drivers.py). None imports Ray."""

# the stages run every registered defense and load its checkpoints by name (kdp.models.build_model):
# importing any stage registers them all
import kdp.baselines  # noqa: E402,F401
