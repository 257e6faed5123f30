"""memguard for training loops other than Lightning's Trainer (each integration imports its library lazily)."""
