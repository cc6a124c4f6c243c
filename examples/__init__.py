"""Example applications of mpchannels (not installed with the package)."""
