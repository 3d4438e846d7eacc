#!/usr/bin/env python3
"""Prints a dinod recipe without its [runtime] and [runtime.*] sections, for the scripts
that add their own (scripts/cluster-soak.sh, scripts/netns-cluster.sh)."""
import sys

out = []
skip = False
for line in open(sys.argv[1]):
    if line.startswith('['):
        skip = line.strip() == '[runtime]' or line.startswith('[runtime.')
    if not skip:
        out.append(line)
print(''.join(out))
