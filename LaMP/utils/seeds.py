"""The seed every stage draws its random numbers from by default, and the seeds allowed."""

# The default --seed of every stage that draws random numbers, so that on-the-fly ranking in
# evaluate/train_llm.py orders profiles as rank_profiles.py does with default flags.
DEFAULT_SEED = 42
# The largest seed every generator we seed accepts: numpy's legacy seeding (which
# transformers' set_seed calls) takes 0 … 2**32 - 1 and rejects anything else with a traceback.
MAX_SEED = 2**32 - 1
