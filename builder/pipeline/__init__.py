"""Stage 5, build: what a flavour supplies, and the build, smoke test and promotion every image goes through."""
