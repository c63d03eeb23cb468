"""The README as the repository's front page: short, its links alive, and the studies' generated tables moved to the
site's results page, where ``study.py readme`` writes them (the site itself is checked by ``mkdocs build --strict``)."""
import re
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
README = (ROOT / 'README.md').read_text()
# the studies whose tables the README held, between <!-- study:NAME --> and <!-- /study:NAME -->
STUDY_BLOCKS = ('ensembles', 'convergence', 'converged', 'collab', 'distill', 'mechanisms', 'overfit', 'fdl-mnist',
                'ablations')


def test_readme_is_short():
    assert len(README.splitlines()) < 200


def test_every_relative_link_of_the_readme_names_a_file_of_the_repository():
    targets = re.findall(r'\]\(([^)\s]+)\)', README)
    relative = [t for t in targets if not re.match(r'[a-z]+:', t) and not t.startswith('#')]
    assert len(relative) >= 10  # the links to the documentation pages
    missing = [t for t in relative if not (ROOT / t.split('#')[0]).exists()]
    assert not missing, f'README.md links to files that do not exist: {missing}'


def test_every_study_table_has_one_place_on_the_results_page_and_none_in_the_readme():
    results = (ROOT / 'docs' / 'results.md').read_text()
    for name in STUDY_BLOCKS:
        start, end = f'<!-- study:{name} -->', f'<!-- /study:{name} -->'
        assert results.count(start) == 1 and results.count(end) == 1, name
        assert results.index(start) < results.index(end), name
        assert start not in README and end not in README, name
