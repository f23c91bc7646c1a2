"""PMA-init tools beside the core: spike recovery, LoRA averaging, soups, weight scopes, WSA and buffers."""
