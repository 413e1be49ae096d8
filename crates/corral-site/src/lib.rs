//! The site directory: site.toml, profiles/ and machines/ loaded, validated and hot-swapped.
