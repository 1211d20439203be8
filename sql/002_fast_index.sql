-- MM-PRM step index, version 2: inspection queries that stay fast at paper scale (1M+ nodes).
-- A run's MC distribution is read from a per-tree histogram written in the same transaction as
-- the tree's nodes, so it never scans the wide step_nodes rows (steps JSONB lives beside mc_value).

ALTER TABLE trees ADD COLUMN mc_histogram INT[];   -- node counts per MC decile, [0,.1) .. [.9,1]
UPDATE trees t SET mc_histogram = ARRAY(
    SELECT count(n.tree_id)::int
    FROM generate_series(0, 9) AS b
    LEFT JOIN step_nodes n ON n.tree_id = t.tree_id AND least(floor(n.mc_value * 10), 9) = b
    GROUP BY b ORDER BY b);
ALTER TABLE trees ALTER COLUMN mc_histogram SET NOT NULL;
ALTER TABLE trees ADD CONSTRAINT trees_mc_histogram_deciles CHECK (cardinality(mc_histogram) = 10);

-- First-error lookups per run read only the index: which trees, which node, where in the solution.
DROP INDEX step_nodes_first_error;
CREATE INDEX step_nodes_first_error ON step_nodes (tree_id) INCLUDE (node_index, prefix_len)
    WHERE is_first_error;
