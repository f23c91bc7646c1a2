"""What the merge-option tests share."""

# MergeOptions fields that shape how a merge runs on this machine, not what it produces: a recipe has no key for them.
RUN_ONLY_OPTIONS = {
    "token",
    "threads",
    "block_elements",
    "reader",
    "progress",
    "dry_run",
    "check_scopes",
    "scope_threshold",
}
