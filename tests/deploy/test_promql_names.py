"""The metric-name extractor the dashboard and alert checks rely on: it must find every selected
metric (so a typo is caught) and nothing that is not one."""

def test_finds_selected_metrics_and_skips_functions_labels_and_variables(promql_names):
    expr = ('histogram_quantile(0.95, sum by (le, model) (rate(vqdm_request_duration_seconds_bucket'
            '{instance=~"$instance",model=~"$model"}[$__rate_interval])))')
    assert promql_names(expr) == {"vqdm_request_duration_seconds_bucket"}


def test_finds_both_sides_of_binary_operations_and_bare_selectors(promql_names):
    expr = ('sum(vqdm_model_weight_bytes{kind="dense_fp16"}) / on(model) group_left(kind) '
            'sum(vqdm_model_weight_bytes{kind="stored"}) > bool 1e3 or vqdm_ready offset 5m '
            'unless up{job="vqdm"} == 0 and process_resident_memory_bytes')
    assert promql_names(expr) == {"vqdm_model_weight_bytes", "vqdm_ready", "up",
                                         "process_resident_memory_bytes"}


def test_a_misspelled_metric_is_reported_not_swallowed(promql_names):
    assert promql_names('rate(vqdm_requets_total{status=~"5.."}[5m])') == {"vqdm_requets_total"}


def test_strings_with_metric_like_words_are_ignored(promql_names):
    assert promql_names('label_replace(up, "dst", "vqdm_fake_total", "job", "(.*)")') == {"up"}
