"""The evaluation protocol (slice choice, chunks, scoring, results) and its reports; no model here."""
