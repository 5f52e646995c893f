"""From a job to stored results: the job spec, the pipeline, array-job shards and data-parallel runs.

(Named ``runner`` rather than ``run`` because ``hessspec.run`` is the public function that runs a job.)
"""
