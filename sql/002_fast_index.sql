-- MM-PRM step index, version 2: writes and inspection queries that keep up at paper scale (1M+ nodes).
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

-- First-error positions of a run read only the index: which trees, which node, where in the
-- solution (prefix_len + num_steps - 1); step texts are fetched only for the nodes shown.
ALTER TABLE step_nodes ADD COLUMN num_steps INT;
UPDATE step_nodes SET num_steps = jsonb_array_length(steps);
ALTER TABLE step_nodes ALTER COLUMN num_steps SET NOT NULL;
DROP INDEX step_nodes_first_error;
CREATE INDEX step_nodes_first_error ON step_nodes (tree_id) INCLUDE (node_index, prefix_len, num_steps)
    WHERE is_first_error;

-- Node writes: every node row used to pay a foreign-key check against trees and an index entry on
-- mc_value that no query uses any more (MC statistics come from the per-tree histograms); together
-- they halved COPY throughput.  Nodes are written only by mmprm_tasks.tree_index.write_trees, in
-- the transaction that upserts their tree and with the tree id it returned, so they always have a
-- tree; deleting trees (directly, or through a run's ON DELETE CASCADE) deletes their nodes with
-- one statement-level trigger.
DROP INDEX step_nodes_mc;
ALTER TABLE step_nodes DROP CONSTRAINT step_nodes_tree_id_fkey;
CREATE FUNCTION step_nodes_follow_deleted_trees() RETURNS trigger LANGUAGE plpgsql AS $$
BEGIN
    DELETE FROM step_nodes n USING deleted_trees d WHERE n.tree_id = d.tree_id;
    RETURN NULL;
END
$$;
CREATE TRIGGER trees_delete_their_nodes AFTER DELETE ON trees REFERENCING OLD TABLE AS deleted_trees
    FOR EACH STATEMENT EXECUTE FUNCTION step_nodes_follow_deleted_trees();
