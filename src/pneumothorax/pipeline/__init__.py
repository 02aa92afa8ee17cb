"""Pipeline steps over experiment folders, the Makefile's freshness, and the scripts' plumbing."""
