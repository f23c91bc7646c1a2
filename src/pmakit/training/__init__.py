"""The transformers glue: `PmaArguments`, `PmaCallback`, `PmaTrainer`, the optimizer route and the exporter."""
