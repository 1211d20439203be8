-- MM-PRM step index, version 4: a seed problem keeps the image_path its seed record gave, so the
-- trees written for it carry that path as the original release's tools expect (the image itself
-- stays content-addressed under image_key).  Rows ingested before this version never recorded
-- it and stay NULL; their trees name the stored image's URI instead.
ALTER TABLE seed_problems ADD COLUMN image_path TEXT;
