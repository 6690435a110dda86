"""Particle tables: one in-memory form (`ParticleTable`), read from and written to the
formats of the subtomogram-averaging tools, one module per format.

Canonical columns of `ParticleTable.data`: `x, y, z` (voxels of the tomogram,
0-based, voxel centres at integers), optional `tomo_name`, `tomo_path`, `class_name`,
`class_number` (0 = background/unknown), `score`, `phi, theta, psi` (ZXZ Euler angles
in degrees, see `euler`); other columns are carried through.

Modules: `table` (the table), `euler` (angle conventions), `relion` (STAR, RELION 4
and 5), `tomograms_star` (RELION 5 tomograms.star), `dynamo` (`.tbl`), `imod` (`.mod`),
`csv_table`, `shrec_list` (SHREC particle_locations.txt) and `formats` (format choice,
`read_particles`, `write_particles`).
"""

from vpdetect.io.particles.euler import (
    dynamo_to_zxz,
    matrix_to_zxz,
    relion_matrix,
    relion_to_zxz,
    zxz_matrix,
    zxz_to_dynamo,
    zxz_to_relion,
)
from vpdetect.io.particles.formats import (
    FORMATS,
    check_format,
    detect_format,
    read_particles,
    write_particles,
)
from vpdetect.io.particles.table import (
    ANGLE_COLUMNS,
    CANONICAL_ORDER,
    DEFAULT_TOMO_NAME,
    ParticleTable,
    TomogramGeometry,
    class_numbers,
)
from vpdetect.io.particles.tomograms_star import (
    TomogramSet,
    assign_tomogram,
    check_table_against_tomogram,
    check_tomogram_header,
    read_tomograms_star,
)

__all__ = [
    "ANGLE_COLUMNS", "CANONICAL_ORDER", "DEFAULT_TOMO_NAME", "FORMATS", "ParticleTable",
    "TomogramGeometry", "TomogramSet", "assign_tomogram", "check_format", "check_table_against_tomogram",
    "check_tomogram_header", "class_numbers", "dynamo_to_zxz", "detect_format", "matrix_to_zxz",
    "read_particles", "read_tomograms_star", "relion_matrix", "relion_to_zxz", "write_particles", "zxz_matrix",
    "zxz_to_dynamo", "zxz_to_relion",
]
