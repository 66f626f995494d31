import numpy as np

from geoloc.geo.countries import default_country_lookup


def test_known_points_and_sea():
    lookup = default_country_lookup()
    pts = np.array([[48.8566, 2.3522], [40.7128, -74.0060], [35.6762, 139.6503], [-33.8688, 151.2093],
                    [64.1466, -21.9426], [0.0, -30.0], [-60.0, 170.0]])
    assert lookup(pts).tolist() == ["FRA", "USA", "JPN", "AUS", "ISL", "", ""]


def test_admin_lookup_countries_and_regions():
    import numpy as np

    from geoloc.geo.countries import default_admin_lookup

    country, admin1 = default_admin_lookup().lookup(np.array([
        [48.8566, 2.3522],     # Paris
        [-33.8688, 151.2093],  # Sydney
        [40.7128, -74.0060],   # New York
        [35.6895, 139.6917],   # Tokyo
        [0.0, -30.0],          # the Atlantic
    ]))
    assert country.tolist() == ["FRA", "AUS", "USA", "JPN", ""]
    assert admin1.tolist() == ["FR-75", "AU-NSW", "US-NY", "JP-13", ""]


def test_admin_lookup_reads_through_the_one_loader(tmp_path):
    import geopandas as gpd
    import pytest
    import shapely

    from geoloc.geo.countries import AdminLookup

    gdf = gpd.GeoDataFrame({"adm0_a3": ["AAA"], "admin1_code": ["AA-1"]}, geometry=[shapely.box(0, 0, 1, 1)],
                           crs=4326)
    gdf.to_parquet(tmp_path / "partial.parquet")
    with pytest.raises(ValueError, match=r"partial.parquet: missing required column\(s\) \['region_id', 'iso_a2'"):
        AdminLookup(tmp_path / "partial.parquet")  # the loader's checks, not a second set of its own


def test_admin_lookup_does_not_import_geocells():
    import subprocess
    import sys

    from .conftest import REPO

    code = ("import sys; from geoloc.geo.countries import default_admin_lookup; default_admin_lookup(); "
            "bad = [m for m in sys.modules if m.split('.')[0] == 'geocells']; assert not bad, bad")
    subprocess.run([sys.executable, "-c", code], cwd=REPO, check=True, timeout=300)
