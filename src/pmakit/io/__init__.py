"""Files and the Hub, without torch: safetensors, weight files, side files, folders, cards, pushes."""
