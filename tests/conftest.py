"""Test-session settings that must be in place before any test imports a tracker client."""

import os

# comet_ml (in the test extra; transformers.integrations imports it when installed) hooks the
# imports of ML libraries that come after it, for its auto-logging: keep the other tests' mlflow,
# tensorboard... unpatched. The Comet tests log through its explicit API only.
os.environ.setdefault("COMET_DISABLE_AUTO_LOGGING", "1")
