-- MM-PRM step index, version 7: a checkpoint the platform trained is named by its key in the
-- object store (`checkpoints/<checkpoint_id>`), not by the store's URI, so a home or a bucket can
-- move (issue 25).  The checkpoints of earlier versions all live under that key: theirs is set
-- from their URI.  `uri` stays for a checkpoint registered from elsewhere (a path or URI).
ALTER TABLE checkpoints ADD COLUMN checkpoint_key TEXT;
UPDATE checkpoints SET checkpoint_key = 'checkpoints/' || checkpoint_id
    WHERE right(rtrim(uri, '/'), length('/checkpoints/' || checkpoint_id)) = '/checkpoints/' || checkpoint_id;
ALTER TABLE checkpoints ALTER COLUMN uri DROP NOT NULL;
UPDATE checkpoints SET uri = NULL WHERE checkpoint_key IS NOT NULL;
ALTER TABLE checkpoints ADD CONSTRAINT checkpoints_location CHECK ((checkpoint_key IS NULL) <> (uri IS NULL));
