"""Experiment configuration: YAML layers (base, methods, datasets, protocols) and run records."""
import warnings

# sacred 0.8.7 imports pkg_resources, whose deprecation warning would open every run's output
warnings.filterwarnings("ignore", message="pkg_resources is deprecated", category=UserWarning)
