"""Taking a result away: export to files, the sparse safetensors format, shrinking dead units, inference."""
