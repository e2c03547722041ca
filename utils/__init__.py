"""Shared plumbing, one job per module: errors (UserError), schema (the keys of config.txt), config (loading
and validating it), files (atomic writes, fsync, temp sweep, locks), processes (parent-death rule, TF_CONFIG,
git hash) and cli (script arguments, logging, run_main). Import from the module that owns a name.
"""
