"""Installable package for ddpm-course; metadata and requirements come from settings.ini."""
from configparser import ConfigParser

import setuptools

config = ConfigParser(delimiters=["="])
config.read("settings.ini", encoding="utf-8")
cfg = config["DEFAULT"]

requirements = cfg.get("requirements", "").split()
dev_requirements = cfg.get("dev_requirements", "").split()
bench_requirements = cfg.get("bench_requirements", "").split()
console_scripts = cfg.get("console_scripts", "").split()

setuptools.setup(
    name=cfg["lib_name"],
    version=cfg["version"],
    description=cfg["description"],
    long_description=open("README.md", encoding="utf-8").read(),
    long_description_content_type="text/markdown",
    author=cfg["author"],
    author_email=cfg["author_email"],
    license="Apache-2.0",
    url=cfg["git_url"],
    keywords=cfg["keywords"].split(),
    python_requires=">=" + cfg["min_python"],
    packages=setuptools.find_packages(include=["ddpm_course", "ddpm_course.*"]),
    include_package_data=True,
    package_data={"ddpm_course": ["pretrained/*/*"]},
    install_requires=requirements,
    extras_require={"dev": dev_requirements, "bench": bench_requirements},
    entry_points={"console_scripts": console_scripts, "nbdev": [f"{cfg['lib_path']}={cfg['lib_path']}._modidx:d"]},
    zip_safe=False,
)
