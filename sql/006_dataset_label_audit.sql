-- MM-PRM step index, version 6: a dataset version names its label audit (its labels against the
-- toy world's ground truth or the step judge, mmprm_tasks/label_audit.py), a JSON report stored
-- beside its paths.  Datasets made before this version leave it NULL; `mmprm audit` computes and
-- records theirs on first use.
ALTER TABLE datasets ADD COLUMN label_audit_key TEXT;
