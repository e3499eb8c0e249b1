"""The engine: builds experiments from configs, trains, predicts, evaluates, reads and writes checkpoints."""
