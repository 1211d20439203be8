-- MM-PRM step index, version 3: Best-of-N candidates are first-class (issue 15).
-- Every evaluation keeps each sampled candidate with its steps, answer, correctness and the step
-- scores of every scorer that read it (JSONB {"prm": [...], "base-model likelihood": [...]}),
-- beside the JSONL copy in the object store (evaluations.candidates_key); see candidates.py.

ALTER TABLE evaluations ADD COLUMN candidates_key TEXT;   -- reports/<evaluation_id>/candidates.jsonl

CREATE TABLE bon_candidates (
    evaluation_id   TEXT NOT NULL REFERENCES evaluations ON DELETE CASCADE,
    problem_id      TEXT NOT NULL,              -- a seed problem of the evaluated split
    candidate_index INT NOT NULL CHECK (candidate_index >= 0),   -- position among the N sampled
    steps           JSONB NOT NULL,             -- list of step texts; the last is the answer part
    final_answer    TEXT,
    correct         BOOLEAN NOT NULL,
    step_scores     JSONB NOT NULL DEFAULT '{}'::jsonb,
    PRIMARY KEY (evaluation_id, problem_id, candidate_index)
);
